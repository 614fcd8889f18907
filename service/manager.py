"""The sandbox manager: the rules of sandboxes as the API sees them. Owners and limits, states and their
transitions (running, frozen, lost), the fork/freeze/resume policy, and engine failures mapped to service errors.

It is the one layer between the HTTP resources and the engine, and it reaches the engine only through its façade
(service/engine/engine.py), injected, so its rules are tested against a fake engine (tests/unit/test_manager.py).
Owners are key ids (service/keys.py); a sandbox that belongs to another key is reported exactly like one that does
not exist.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance_agent import frames
from appliance_agent.files import DEFAULT_PAGE as LIST_PAGE  # entries per files/list page

from service.engine import (
    Engine,
    EngineError,
    ExecResult,
    LauncherError,
    NetworkError,
    NetworkRequest,
    NetworkUnavailable,
    PolicyError,
    Sandbox,
    SandboxBusy,
    SandboxClosed,
    SandboxLost,
    SnapshotMismatch,
    SnapshotTampered,
    TemplateError,
)

from . import attachments, file_entries, file_watch, routing
from .errors import (
    Busy,
    InsufficientCapacity,
    InsufficientStorage,
    Invalid,
    InvalidField,
    LimitReached,
    NotFound,
    NotReady,
    SandboxLostError,
    ServiceError,
    SnapshotExists,
    SnapshotIncompatible,
    SnapshotInvalid,
)
from .errors import NetworkUnavailable as NetworkUnavailableError
from .registry import (
    CREATING,
    FREEZING,
    FROZEN,
    LOST,
    POOLED,
    PUBLIC,
    READY,
    RESUMING,
    RUNNING,
    TOUCH_EVERY_S,
    FrozenRoom,
    Full,
    Limits,
    NameTaken,
    Registry,
    SandboxRecord,
    SnapshotRecord,
)
from .settings import ServiceConfig, owner_ids
from .snapshot_names import DEFAULT_TEMPLATE, name_problem
from .template_store import TemplateStore

log = logging.getLogger(__name__)
FILE_CHUNK = 1 << 20
FILE_CALL_TIMEOUT_S = 60.0
# Free disk a freeze needs beyond the guest's memory: device state, the snapshot's metadata, the filesystem's own.
FREEZE_DISK_MARGIN_MIB = 64


def new_sandbox_id(node_tag: str = "") -> str:
    """`sb-<hex>`, or `sb-<tag>-<hex>` on a node with service.node_tag (service/routing.py)."""
    return routing.new_sandbox_id(node_tag)


class SandboxManager:
    def __init__(self, config: ServiceConfig, engine: Engine | None = None, registry: Registry | None = None,
                 host_meminfo: Callable[[], dict[str, int]] | None = None) -> None:
        """`engine` and `host_meminfo` (/proc/meminfo in bytes: MemTotal, MemAvailable) are injected in tests; so
        are, as attributes, `host_cpus`, `disk_free` (free bytes of the filesystem holding a path) and `clock`."""
        self.config = config
        self.host_meminfo = host_meminfo or _meminfo
        self.host_cpus: Callable[[], int] = lambda: os.cpu_count() or 1
        self.disk_free: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free
        self.clock: Callable[[], float] = time.time
        # When this process last wrote each sandbox's last use to the registry (see _mark_used).
        self._stamped: dict[str, float] = {}
        self.engine = engine or Engine(config.engine)
        self.registry = registry or Registry(config.registry_path)
        moved = self.registry.migrate_owners(owner_ids(config, self.registry.owners()))
        if moved:
            log.info("%d sandboxes of an older registry now belong to their key's id", moved)
        self.templates = TemplateStore(config.templates_dir)
        self.attachments = attachments.Attachments()

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def readiness(self) -> str | None:
        """None when creates can be served from a warm template; else why not."""
        if self.templates.current() is None:
            failure = self.templates.last_failure()
            if failure is not None:
                return f"no warm template: the pool keeper failed to make one and retries ({failure})"
            return "no warm template yet: the pool keeper is still booting it"
        return None

    def create(
        self,
        owner: str,
        vcpus: int | None = None,
        memory_mib: int | None = None,
        timeout_s: float | None = None,
        metadata: dict[str, Any] | None = None,
        persistent: bool = False,
        network_policy: dict[str, Any] | None = None,
        snapshot: str | None = None,
        template: str | None = None,
        envs: dict[str, str] | None = None,
    ) -> SandboxRecord:
        """A running sandbox for `owner`: a pooled clone if one is ready, else a clone of the warm template, else
        (a non-default size) a cold boot. `persistent` sandboxes are frozen, not closed, when idle too long.
        `network_policy` ({"egress": ...}, see netpolicy.py) gives it a filtered network; None: no network.
        `snapshot` (the owner's named snapshot) or `template` (a published one; "default": the warm template) is
        what it is cloned from, in that one's size. `envs` become the sandbox's environment variables: kept in the
        guest's memory only (so a fork, freeze and resume keep them), never in the registry or a log."""
        named = self._named_source(owner, snapshot, template)
        wanted = self._network_request(network_policy)  # a bad policy or unresolvable name fails before anything
        if named is not None:
            return self._create_from(owner, named, timeout_s, metadata, persistent, wanted, envs)
        template = self.templates.current()
        wants_default_size = (vcpus in (None, self.engine.config.vcpus)) and (
            memory_mib in (None, self.engine.config.memory_mib)
        )
        if template is None and wants_default_size:
            raise NotReady("the service is still warming its template; retry shortly", retry_after=2)
        (place,) = self._admit(owner, 1, memory_mib or self.engine.config.memory_mib,
                               vcpus or self.engine.config.vcpus, timeout_s or self.config.sandbox_timeout_s,
                               metadata or {}, persistent)
        try:
            if template is not None and wants_default_size:
                claimed = self.registry.claim_pooled(owner, template.template_id, place.timeout_s, place.metadata,
                                                     persistent, reserved_id=place.id)
                if claimed is not None:
                    place = claimed
                    pooled = self._usable_pooled(claimed)
                    if pooled is not None:
                        # No reseed here: the keeper reseeded this clone when it made it, and its clock has run.
                        if wanted is not None:
                            claimed.network = self._give_network(pooled, wanted)
                            self.registry.set_state(claimed.id, RUNNING, network=claimed.network)
                        if envs:
                            self._give_envs(pooled, envs)
                        return claimed
                sandbox = self.engine.clone(template, place.id)
                place.template_id = template.template_id
            else:
                sandbox = self.engine.boot(vcpus=vcpus, memory_mib=memory_mib, detach=True, vm_id=place.id,
                                           agent_ports=self.config.agent_ports)
            place.network = self._equip(sandbox, wanted, envs)
        except BaseException:
            self._give_back(place)
            raise
        place.vm_dir, place.machine = str(sandbox.vm_dir), self.engine.machine_json(sandbox)
        sandbox.detach()  # the creating connection used port 0; workers attach on their own ports
        self.registry.complete(place)
        self._stamped[place.id] = place.last_active_at
        return place

    def _named_source(self, owner: str, snapshot: str | None, template: str | None) -> SnapshotRecord | None:
        """The ready snapshot (of `owner`) or published template a create names; None for the warm template.
        Another key's snapshot is reported exactly like one that never existed."""
        if snapshot is not None:
            found, what = self.registry.snapshot(owner, snapshot), f"no snapshot {snapshot!r}"
        elif template not in (None, DEFAULT_TEMPLATE):
            found, what = self.registry.snapshot(PUBLIC, template), f"no template {template!r}"
        else:
            return None
        if found is None or found.state != READY:
            raise NotFound(f"{what} (it never existed, was deleted, belongs to another key, or is still being "
                           "saved)")
        return found

    def _create_from(self, owner: str, named: SnapshotRecord, timeout_s: float | None,
                     metadata: dict[str, Any] | None, persistent: bool, wanted: NetworkRequest | None,
                     envs: dict[str, str] | None = None) -> SandboxRecord:
        """A sandbox cloned from a named snapshot or published template, as a fork's copy is made: it maps the
        snapshot's RAM copy-on-write, is reseeded and has its clock set."""
        origin = {"from_snapshot" if named.owner != PUBLIC else "from_template": named.name}
        (place,) = self._admit(owner, 1, int(named.machine["memory_mib"]), _vcpus(named.machine),
                               timeout_s or self.config.sandbox_timeout_s, {**(metadata or {}), **origin},
                               persistent)
        try:
            try:
                template = self.engine.template(named.template_id or "")
            except TemplateError as exc:  # its files are gone (a host reboot empties the run directory)
                raise SnapshotInvalid(f"snapshot {named.name!r} cannot be used: {exc}; delete it") from None
            try:
                sandbox = self.engine.clone(template, place.id)
            except (EngineError, OSError) as exc:
                raise ServiceError(f"creating a sandbox from {named.name!r} failed: {exc}") from None
            place.network = self._equip(sandbox, wanted, envs)
        except BaseException:
            self.registry.release([place.id])
            raise
        place.vm_dir, place.template_id = str(sandbox.vm_dir), template.template_id
        place.machine = self.engine.machine_json(sandbox)
        sandbox.detach()
        self.registry.complete(place)
        self._stamped[place.id] = place.last_active_at
        return place

    def _usable_pooled(self, claimed: SandboxRecord) -> Sandbox | None:
        """The claimed pooled clone, attached; None if it died while it waited (its place is then the request's,
        reserved again, for a fresh clone under the same id)."""
        try:
            return self._attach(claimed)
        except (SandboxLost, SandboxClosed, OSError) as exc:
            log.warning("pooled sandbox %s was unusable (%s); cloning a fresh one", claimed.id, exc)
            self._stop_vm(claimed)
            self.registry.set_state(claimed.id, CREATING)
            claimed.state = CREATING
            return None

    def _give_back(self, place: SandboxRecord) -> None:
        """A create that failed: its place goes (the engine stops what it started when it fails)."""
        if place.state == RUNNING:  # a pooled clone already handed over: it is removed whole
            self._destroy(place)
        else:
            self.registry.release([place.id])

    def get(self, owner: str, sandbox_id: str) -> SandboxRecord:
        record = self.registry.get(sandbox_id)
        if record is None or record.owner != owner or record.state in (POOLED, CREATING):
            raise NotFound(f"no sandbox {sandbox_id!r} (it never existed, was closed, or belongs to another key)")
        return _as_seen(record)

    def list(self, owner: str, state: str | None = None) -> list[SandboxRecord]:
        seen = [_as_seen(record) for record in self.registry.list(owner=owner) if record.state != CREATING]
        return [record for record in seen if state is None or record.state == state]

    def set_timeout(self, owner: str, sandbox_id: str, timeout_s: float) -> SandboxRecord:
        """The sandbox's idle period from now on (its clock restarts now)."""
        self.get(owner, sandbox_id)
        self.registry.set_timeout(sandbox_id, timeout_s, self.clock())
        return self.get(owner, sandbox_id)

    def delete(self, owner: str, sandbox_id: str) -> None:
        self._destroy(self.get(owner, sandbox_id))

    # ---- code ------------------------------------------------------------------------------------------------

    def exec_events(
        self, owner: str, sandbox_id: str, code: str, language: str = "python", timeout_s: float | None = None,
        envs: dict[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The exec's events as they come; raises Busy / NotFound / SandboxLostError before the first one."""
        record = self._running(owner, sandbox_id)
        lock_fd = attachments.take_code_lock(Path(record.vm_dir))
        try:
            sandbox = self._attach(record)
            self._mark_used(sandbox_id)
            events = sandbox.exec_events(code, timeout_s=timeout_s, language=language,
                                         **({"envs": envs} if envs else {}))
            first = next(events)
        except SandboxBusy as exc:
            os.close(lock_fd)
            raise Busy(str(exc)) from None
        except (SandboxLost, SandboxClosed) as exc:
            os.close(lock_fd)
            self._mark_lost(record)
            raise SandboxLostError(str(exc)) from None
        except BaseException:
            os.close(lock_fd)
            raise
        return self._rest_of(record, first, events, lock_fd)

    def _rest_of(self, record: SandboxRecord, first: dict, events: Iterator[dict],
                 lock_fd: int) -> Iterator[dict[str, Any]]:
        try:
            yield first
            yield from events
        except SandboxLost as exc:
            self._mark_lost(record)
            yield {"ev": "done", "error": {"name": "SandboxLost", "value": str(exc), "traceback": ""}, "lost": True}
        finally:
            os.close(lock_fd)
            self._mark_used(record.id)

    def exec(self, owner: str, sandbox_id: str, code: str, language: str = "python",
             timeout_s: float | None = None) -> ExecResult:
        result = ExecResult()
        for event in self.exec_events(owner, sandbox_id, code, language, timeout_s):
            result.add(event)
        return result

    def commands_sandbox(self, owner: str, sandbox_id: str) -> Sandbox:
        """This process's second connection to the sandbox, for commands (service/commands.py): a frozen sandbox
        is resumed first; use counts as activity."""
        record = self._running(owner, sandbox_id)
        self._mark_used(sandbox_id)
        return self.attachments.get(record.id, Path(record.vm_dir), self.engine.agent_ports(record.machine),
                                    lambda directory, port: self.engine.connect(directory, record.machine, port),
                                    purpose="commands")

    def _equip(self, sandbox: Sandbox, wanted: NetworkRequest | None,
               envs: dict[str, str] | None) -> dict[str, Any] | None:
        """A new VM's network (its record, or None) and envs; the VM is closed if either fails (nobody else would
        ever stop it)."""
        try:
            network = None if wanted is None else self._give_network(sandbox, wanted)
            if envs:
                self._give_envs(sandbox, envs)
        except BaseException:
            sandbox.close()
            raise
        return network

    def _give_envs(self, sandbox: Sandbox, envs: dict[str, str]) -> None:
        reply = sandbox.call("set_env", envs=envs)
        if reply.get("ev") != "ok":  # the API checked them as the agent does: this is not the client's error
            raise ServiceError(f"the guest refused the sandbox's envs: {str(reply.get('message'))[:200]}")

    def interrupt(self, owner: str, sandbox_id: str) -> None:
        record = self._running(owner, sandbox_id)
        self._attach(record).interrupt()

    # ---- files -----------------------------------------------------------------------------------------------

    def write_file(self, owner: str, sandbox_id: str, path: str, chunks: Iterable[bytes]) -> dict[str, Any]:
        """Stream `chunks` into a file in the sandbox (relative paths are under /data); nothing is buffered whole.
        The bytes go to a temporary name beside the file and are renamed over it at the end: nobody in the sandbox
        ever sees a half-written file, and a failed upload leaves the old one as it was."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        digest, size, append = hashlib.sha256(), 0, False
        upload = secrets.token_hex(8)
        try:
            for piece in _rechunk(chunks, FILE_CHUNK):
                self._file_call(sandbox, "file_write", path, payload=piece, append=append, upload=upload)
                digest.update(piece)
                size += len(piece)
                append = True
            if not append:  # an empty upload still makes (or empties) the file
                self._file_call(sandbox, "file_write", path, append=False, upload=upload)
            self._file_call(sandbox, "file_commit", path, upload=upload)
        except BaseException:
            with contextlib.suppress(Exception):
                self._file_call(sandbox, "file_commit", path, upload=upload, abort=True)
            raise
        self._mark_used(sandbox_id)
        return {"path": path, "size": size, "sha256": digest.hexdigest()}

    def read_file(self, owner: str, sandbox_id: str, path: str) -> tuple[int, Iterator[bytes]]:
        """(size, chunks) of a file in the sandbox; the first chunk is fetched now, so a missing file fails here."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        first = self._file_call(sandbox, "file_read", path, offset=0, max=FILE_CHUNK)
        size = first["size"]

        def chunks() -> Iterator[bytes]:
            reply, offset = first, 0
            while True:
                data = reply.get(frames.PAYLOAD_KEY, b"")
                offset += len(data)
                if data:
                    yield data
                if reply.get("eof") or not data or offset >= size:
                    return
                reply = self._file_call(sandbox, "file_read", path, offset=offset, max=FILE_CHUNK)

        self._mark_used(sandbox_id)
        return size, chunks()

    def list_dir(self, owner: str, sandbox_id: str, path: str, limit: int = LIST_PAGE,
                 cursor: str | None = None, depth: int = 1) -> dict[str, Any]:
        """One page of a directory, in name order: {entries, more, cursor}; pass `cursor` back for the next page.
        With depth > 1, subdirectories' entries follow their directory (names relative to `path`).
        The guest's reply is held to `limit` entries whatever it sends."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        args: dict[str, Any] = {"limit": limit} if cursor is None else {"limit": limit, "after": cursor}
        if depth != 1:
            args["depth"] = depth
        reply = self._file_call(sandbox, "list_dir", path, **args)
        entries = reply.get("entries")
        entries = entries[:limit] if isinstance(entries, list) else []
        more = reply.get("more") is True and isinstance(reply.get("after"), str)
        return {"entries": entries, "more": more, "cursor": reply["after"] if more else None}

    def stat_file(self, owner: str, sandbox_id: str, path: str) -> dict[str, Any]:
        """The entry at `path` (a link as a link): {name, path, type, size, mtime, mode[, target]}."""
        reply = self._file_op(owner, sandbox_id, "file_stat", path)
        return file_entries.stat_reply(reply)

    def remove_file(self, owner: str, sandbox_id: str, path: str, recursive: bool = False) -> None:
        self._file_op(owner, sandbox_id, "file_remove", path, recursive=recursive)

    def make_dir(self, owner: str, sandbox_id: str, path: str, parents: bool = True) -> bool:
        """True if it was made, False if it was there already."""
        return self._file_op(owner, sandbox_id, "file_mkdir", path, parents=parents).get("created") is True

    def rename_file(self, owner: str, sandbox_id: str, path: str, to: str, overwrite: bool = False) -> None:
        self._file_op(owner, sandbox_id, "file_rename", path, to=to, overwrite=overwrite)

    def watch_files(self, owner: str, sandbox_id: str, path: str, recursive: bool, duration_s: float,
                    clock: Callable[[], float] = time.monotonic) -> Iterator[dict[str, Any]]:
        """Events under a directory until `duration_s` passes, the directory goes or the caller closes the
        iterator. The watch is placed now (so a bad path fails before a stream starts); see file_watch.py."""
        sandbox = self._attach(self._running(owner, sandbox_id))
        started = self._file_call(sandbox, "watch_start", path, recursive=recursive)
        self._mark_used(sandbox_id)
        return file_watch.stream(lambda op, **args: self._file_call(sandbox, op, path, **args),
                                 str(started.get("watch", "")), duration_s, clock)

    def _file_op(self, owner: str, sandbox_id: str, op: str, path: str, **args: Any) -> dict[str, Any]:
        reply = self._file_call(self._attach(self._running(owner, sandbox_id)), op, path, **args)
        self._mark_used(sandbox_id)
        return reply

    def _file_call(self, sandbox: Sandbox, op: str, path: str, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        try:
            reply = sandbox.call(op, timeout_s=FILE_CALL_TIMEOUT_S, payload=payload, path=path, **args)
        except SandboxBusy as exc:
            raise Busy(str(exc)) from None
        except SandboxLost as exc:
            raise SandboxLostError(str(exc)) from None
        if reply.get("ev") == "error":
            code = reply.get("code")
            message = reply.get("message", "file operation failed")
            raise file_entries.error_for(code, message)
        return reply

    # ---- fork, freeze, resume --------------------------------------------------------------------------------

    def snapshot_dir(self, sandbox_id: str) -> Path:
        return self.config.state_dir / "snapshots" / sandbox_id

    def _resume_lock(self, sandbox_id: str) -> Path:
        """Beside the snapshot (which a resume removes): held by whoever resumes the sandbox, flock."""
        return self.snapshot_dir(sandbox_id).with_name(f"{sandbox_id}.lock")

    def freeze(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Write the sandbox's whole state under the state dir and stop its VM. A failure leaves it running."""
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:
            return record
        return self.freeze_record(self._running(owner, sandbox_id))

    def freeze_record(self, record: SandboxRecord) -> SandboxRecord:
        # The key's frozen share, the quota and free disk are checked and the freeze reserved in one registry
        # transaction (FREEZING): two concurrent freezes cannot both pass a check made before either is stored.
        if not self._reserve_freeze(record):
            now = self.registry.get(record.id)
            if now is not None and now.state == FROZEN:
                return _as_seen(now)
            raise Busy(f"sandbox {record.id} is being frozen or resumed by another request; retry when it is done")
        try:
            sandbox = self._attach_alive(record)
            with _code_locked(record, f"freezing {record.id} failed; it keeps running"):
                self.engine.freeze(sandbox, self.snapshot_dir(record.id), self.config.compress_snapshots,
                                   networked=record.network is not None)
        except BaseException:
            self.registry.release([record.id])  # FREEZING: running again (a lost one stays lost)
            raise
        self.attachments.forget(record.id)
        self._stamped.pop(record.id, None)
        self.registry.set_state(record.id, FROZEN, template_id=None)  # a snapshot holds all of its RAM
        self.templates.release(record.template_id, self.registry)
        record.state, record.template_id = FROZEN, None
        return record

    def resume(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """Restore a frozen sandbox (same process state, new entropy, the right clock)."""
        record = self.get(owner, sandbox_id)
        if record.state != FROZEN:
            return record
        self._check_host_memory(1, self.engine.memory_mib(record.machine))
        with attachments.held(self._resume_lock(sandbox_id)):
            # Admitted in the registry transaction that counts the limits (another worker may have resumed it
            # while we waited: then there is nothing to do).
            if not self._admit_resume(sandbox_id):
                return self.get(owner, sandbox_id)
            try:
                self._resume_admitted(record)
            except BaseException:
                self.registry.release([sandbox_id])  # it stays frozen, and its place goes
                raise
        return self.get(owner, sandbox_id)

    def _admit_resume(self, sandbox_id: str) -> bool:
        try:
            return self.registry.reserve_resume(sandbox_id, self._limits())
        except Full as exc:
            raise self._refusal(exc) from None

    def _resume_admitted(self, record: SandboxRecord) -> None:
        """Restore the admitted sandbox into a new VM and make it running; raises with it still frozen."""
        sandbox_id, directory = record.id, self.snapshot_dir(record.id)
        try:
            sandbox = self.engine.resume(directory, _fresh_vm_id(sandbox_id))
        except SnapshotMismatch as exc:
            raise SnapshotIncompatible(f"sandbox {sandbox_id} cannot be resumed on this host: {exc}") from None
        except SnapshotTampered as exc:
            log.error("refused to resume %s: %s", sandbox_id, exc)
            raise SnapshotInvalid(f"sandbox {sandbox_id} cannot be resumed: {exc}; it stays frozen") from None
        except (EngineError, OSError) as exc:
            raise ServiceError(f"resuming {sandbox_id} failed; it stays frozen: {exc}") from None
        try:
            given = None if record.network is None else self._give_network(
                sandbox, self._network_request(record.network))
        except ServiceError as exc:
            sandbox.close()
            raise type(exc)(f"resuming {sandbox_id} failed; it stays frozen: {exc.message}") from None
        except BaseException:
            sandbox.close()
            raise
        sandbox.detach()
        now = self.clock()
        self.registry.set_state(sandbox_id, RUNNING, vm_dir=str(sandbox.vm_dir),
                                machine=self.engine.machine_json(sandbox), last_active_at=now,
                                network=given)
        self._stamped[sandbox_id] = now
        shutil.rmtree(directory, ignore_errors=True)

    def fork(self, owner: str, sandbox_id: str, n: int) -> list[SandboxRecord]:
        """n new running sandboxes, each starting from this one's state now; the source keeps running."""
        if not 1 <= n <= self.config.max_fork:
            raise Invalid(f"n must be between 1 and {self.config.max_fork} (service.max_fork)")
        record = self._running(owner, sandbox_id)
        wanted = None if record.network is None else self._network_request(record.network)
        places = self._admit(owner, n, self.engine.memory_mib(record.machine), _vcpus(record.machine),
                             record.timeout_s, {**record.metadata, "forked_from": sandbox_id}, record.persistent)
        failure = f"fork of {sandbox_id} failed; it keeps running unchanged"
        try:
            sandbox = self._attach_alive(record)
            with _code_locked(record, failure):
                template, clones = self.engine.fork(sandbox, [place.id for place in places],
                                                    networked=record.network is not None)
            try:  # each clone: the parent's policy, its own namespace, MAC and address
                networks = [None if wanted is None else self._give_network(clone, wanted) for clone in clones]
            except BaseException as exc:
                for clone in clones:
                    clone.close()
                template.remove()
                if isinstance(exc, ServiceError):
                    raise type(exc)(f"{failure}: {exc.message}") from None
                raise
        except BaseException:
            self.registry.release([place.id for place in places])
            raise
        for place, clone, given in zip(places, clones, networks, strict=True):
            clone.detach()
            place.vm_dir, place.template_id = str(clone.vm_dir), template.template_id
            place.machine, place.network = self.engine.machine_json(clone), given
            self.registry.complete(place)
            self._stamped[place.id] = place.last_active_at
        return places

    # ---- named snapshots ---------------------------------------------------------------------------------------

    def snapshot(self, owner: str, sandbox_id: str, name: str) -> SnapshotRecord:
        """Save the sandbox's whole live state under `name` (the owner's); it keeps running. Admitted like a
        freeze (the key's frozen share, the quota, free space where the state is written: the run directory,
        whose files copies map) in one registry transaction; a failure leaves the sandbox as it was."""
        problem = name_problem(name)
        if problem is not None:
            raise InvalidField("name", problem)
        record = self._running(owner, sandbox_id)
        saved = SnapshotRecord(owner=owner, name=name, state=FREEZING, template_id=None, source=sandbox_id,
                               machine={"memory_mib": self.engine.memory_mib(record.machine),
                                        "vcpus": _vcpus(record.machine)})
        self.config.templates_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.registry.reserve_snapshot(saved, self._frozen_room(self.config.templates_dir))
        except NameTaken:
            raise SnapshotExists(f"this key already has a snapshot named {name!r}; delete it or pick another "
                                 "name") from None
        except Full as exc:
            raise self._frozen_refusal(exc, f"sandbox {sandbox_id} keeps running", "memory filesystem for the snapshot"
                                       ) from None
        try:
            sandbox = self._attach_alive(record)
            with _code_locked(record, f"snapshot of {sandbox_id} failed; it keeps running unchanged"):
                template = self.engine.snapshot(sandbox, networked=record.network is not None)
        except BaseException:
            self.registry.remove_snapshot(owner, name)
            raise
        saved.template_id, saved.size_bytes = template.template_id, template.size_bytes
        self.registry.complete_snapshot(saved)
        self._mark_used(sandbox_id)
        return saved

    def snapshots(self, owner: str) -> list[SnapshotRecord]:
        return self.registry.snapshots(owner)

    def get_snapshot(self, owner: str, name: str) -> SnapshotRecord:
        found = self.registry.snapshot(owner, name) if name_problem(name) is None else None
        if found is None:
            raise NotFound(f"no snapshot {name!r} (it never existed, was deleted, or belongs to another key)")
        return found

    def delete_snapshot(self, owner: str, name: str) -> None:
        """Forget the snapshot; its files go as soon as no sandbox made from it (and no template) maps them."""
        found = self.get_snapshot(owner, name)
        self.registry.remove_snapshot(owner, name)
        self.templates.release(found.template_id, self.registry)

    def _reserve_freeze(self, record: SandboxRecord) -> bool:
        """Admit a freeze of `record` (False: it is not running any more)."""
        memory_mib = self.engine.memory_mib(record.machine)
        try:
            return self.registry.reserve_freeze(record.id, memory_mib, self._frozen_room(self._frozen_root()))
        except Full as exc:
            raise self._frozen_refusal(exc, f"sandbox {record.id} keeps running", "disk to freeze") from None

    def _frozen_root(self) -> Path:
        root = self.config.state_dir / "snapshots"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return root

    def _frozen_room(self, written_in: Path) -> FrozenRoom:
        """What the next freeze or snapshot is admitted against, measured now: free space where it is written
        (a freeze writes up to all of the guest's RAM; one that ran out of disk half way would fail anyway, after
        filling it), the disk frozen sandboxes use, the key's share and the quota."""
        root = self._frozen_root()
        used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        return FrozenRoom(share=self.config.max_frozen_per_key, free_mib=self.disk_free(written_in) >> 20,
                          used_bytes=used, quota_bytes=self.config.frozen_quota_bytes,
                          margin_mib=FREEZE_DISK_MARGIN_MIB)

    def _frozen_refusal(self, exc: Full, keeps: str, room: str) -> ServiceError:
        """The API's error for a refused freeze or snapshot, naming the setting that bounds it."""
        if exc.what == "frozen_share":
            return LimitReached(f"{exc} (service.max_frozen_per_key), named snapshots included; delete or resume one "
                                "first", retry_after=5)
        if exc.what == "disk":
            return InsufficientCapacity(f"not enough {room}: {exc}; {keeps}")
        return InsufficientStorage(f"{exc} (service.frozen_quota_bytes); delete frozen sandboxes or snapshots, or "
                                   "raise the quota")

    def _admit(self, owner: str, n: int, memory_mib: int, vcpus: int, timeout_s: float, metadata: dict[str, Any],
               persistent: bool) -> list[SandboxRecord]:
        """Places for n new sandboxes, reserved in the registry in one transaction with the checks of the per-key
        and host limits and of committed guest memory, so concurrent requests cannot overshoot them."""
        self._check_host_memory(n, memory_mib)
        places = [
            SandboxRecord(id=new_sandbox_id(self.config.node_tag), owner=owner, state=CREATING, vm_dir="",
                          template_id=None, machine={"memory_mib": memory_mib, "vcpus": vcpus}, timeout_s=timeout_s,
                          metadata=dict(metadata), persistent=persistent)
            for _ in range(n)
        ]
        try:
            self.registry.reserve(places, self._limits())
        except Full as exc:
            raise self._refusal(exc) from None
        return places

    def _limits(self) -> Limits:
        return Limits(per_key=self.config.max_sandboxes_per_key, host=self.config.max_sandboxes,
                      memory_mib=self._committable_mib(), vcpus=self._committable_vcpus())

    def _refusal(self, exc: Full) -> ServiceError:
        """The API's error for a refused admission, naming what was short and the setting that bounds it."""
        if exc.what == "per_key":
            return LimitReached(f"{exc} (service.max_sandboxes_per_key); delete one first", retry_after=5)
        if exc.what == "host":
            return LimitReached(f"{exc} (service.max_sandboxes); retry later", retry_after=10)
        if exc.what == "vcpus":
            return InsufficientCapacity(f"not enough host vCPUs: {exc} (service.vcpu_overcommit × {self.host_cpus()} "
                                        "host CPUs); delete or freeze sandboxes")
        return InsufficientCapacity(f"not enough host memory: {exc} (service.memory_overcommit × host memory "
                                    "less the reserve); delete or freeze sandboxes")

    def free_capacity(self) -> routing.Capacity:
        """Room for new sandboxes, as the node reports it to the balancer's agent check (service/agent_check.py):
        slots under service.max_sandboxes and committable guest memory left."""
        committable = self._committable_mib()
        return routing.Capacity(
            slots_free=self.config.max_sandboxes - self.registry.count(), slots_total=self.config.max_sandboxes,
            memory_free_mib=None if committable is None else committable - self.registry.committed_mib(),
            memory_total_mib=committable)

    def has_room(self, memory_mib: int, vcpus: int = 1) -> bool:
        """Could one more guest of `memory_mib` and `vcpus` be admitted now (the pool keeper asks before making a
        clone)?"""
        limits = self._limits()
        try:
            self._check_host_memory(1, memory_mib)
        except InsufficientCapacity:
            return False
        return ((limits.memory_mib is None or self.registry.committed_mib() + memory_mib <= limits.memory_mib)
                and (limits.vcpus is None or self.registry.committed_vcpus() + vcpus <= limits.vcpus))

    def _committable_vcpus(self) -> float:
        """vCPUs all live and pooled sandboxes may have together."""
        return self.config.vcpu_overcommit * self.host_cpus()

    def _host_reserve_mib(self, total_mib: float) -> float:
        """Host memory kept for the host itself: service.memory_reserve_mib, else max(2 GiB, 10 %) but at most half
        of it (a 2 GiB reserve on a 3 GiB node would refuse every sandbox; see docs/architecture.md)."""
        if self.config.memory_reserve_mib is not None:
            return self.config.memory_reserve_mib
        return min(max(2048.0, total_mib / 10), total_mib / 2)

    def _committable_mib(self) -> float | None:
        """Guest memory all live and pooled sandboxes may be configured with together (None: host unknown)."""
        total = self.host_meminfo().get("MemTotal")
        if total is None:
            return None
        total_mib = total / (1 << 20)
        return self.config.memory_overcommit * max(0.0, total_mib - self._host_reserve_mib(total_mib))

    def _check_host_memory(self, n: int, memory_mib: int) -> None:
        """The host must keep its reserve free after n more guests start: each is counted at a quarter of its
        memory (copies and clones share their template's pages until they write them)."""
        info = self.host_meminfo()
        total, available = info.get("MemTotal"), info.get("MemAvailable")
        if total is None or available is None:
            return  # no /proc/meminfo: not refused on a guess
        reserve_mib = self._host_reserve_mib(total / (1 << 20))
        needed_mib = n * memory_mib / 4
        available_mib = available / (1 << 20)
        if available_mib - needed_mib < reserve_mib:
            raise InsufficientCapacity(
                f"not enough host memory: {n} more sandbox(es) need about {needed_mib:.0f} MiB, {available_mib:.0f} "
                f"MiB is available and {reserve_mib:.0f} MiB is kept for the host (service.memory_reserve_mib)"
            )

    # ---- network ---------------------------------------------------------------------------------------------

    def _network_request(self, requested: dict[str, Any] | None) -> NetworkRequest | None:
        """The policy checked and its names resolved (now: at creation, and again at each resume)."""
        try:
            return self.engine.network_request(requested, self.config.network)
        except PolicyError as exc:  # e.g. a name this host cannot resolve: the client's field, as the API says
            raise InvalidField("network", str(exc)) from None
        except NetworkUnavailable as exc:
            raise NetworkUnavailableError(str(exc)) from None

    def _give_network(self, sandbox: Sandbox, wanted: NetworkRequest) -> dict[str, Any]:
        """Attach the network; returns the record's `network` column (policy plus the new identity)."""
        try:
            return self.engine.give_network(sandbox, wanted, self.config.network)
        except (NetworkError, LauncherError) as exc:  # the host (or its launcher) could not build it: not a 500
            raise NetworkUnavailableError(str(exc)) from None

    # ---- internals -------------------------------------------------------------------------------------------

    def _mark_used(self, sandbox_id: str) -> None:
        """The sandbox was used now (an exec, a file call). Not a registry write per call (the hot path would pay
        for a SQLite write twice per exec): this process writes the time only when its own last write for the
        sandbox is TOUCH_EVERY_S old or older. Each API worker does the same for itself with its own memory, and
        the registry keeps the largest stamp any wrote, so it is never more than TOUCH_EVERY_S behind the last use
        by any worker; the reaper (Registry.idle_since) gives every idle lifetime that much grace, and so never
        closes or freezes a sandbox that another worker used within its timeout_s. A use that was not written is
        covered by the write before it, so nothing needs flushing later, at close or freeze (a freeze or resume
        writes the state and time of its own)."""
        now = self.clock()
        if now - self._stamped.get(sandbox_id, float("-inf")) < TOUCH_EVERY_S:
            return
        self.registry.touch(sandbox_id, now)
        self._stamped[sandbox_id] = now
        if len(self._stamped) > 4096:  # forget what no longer saves a write (closed sandboxes, idle ones)
            self._stamped = {key: at for key, at in self._stamped.items() if now - at < TOUCH_EVERY_S}

    def _running(self, owner: str, sandbox_id: str) -> SandboxRecord:
        """The sandbox, running: a frozen one is resumed first, transparently."""
        record = self.get(owner, sandbox_id)
        if record.state == FROZEN:  # (or resuming elsewhere: resume waits for that one)
            record = self.resume(owner, sandbox_id)
        if record.state == LOST:
            raise _lost(sandbox_id)
        return record

    def _attach(self, record: SandboxRecord) -> Sandbox:
        """This process's connection to the sandbox, made once on a free agent port and then reused."""
        vm_dir = Path(record.vm_dir)
        return self.attachments.get(record.id, vm_dir, self.engine.agent_ports(record.machine),
                                    lambda directory, port: self.engine.connect(directory, record.machine, port))

    def _stop_vm(self, record: SandboxRecord) -> None:
        self.attachments.forget(record.id)
        self.engine.stop(Path(record.vm_dir), record.machine)

    def _attach_alive(self, record: SandboxRecord) -> Sandbox:
        """_attach for a freeze or a fork, which work on the VM itself: a VM that died since the pool keeper last
        looked makes the sandbox lost (410) here and now, not an internal error half way through."""
        try:
            sandbox = self._attach(record)
            if sandbox.running:
                return sandbox
        except (SandboxLost, SandboxClosed):
            pass
        self._mark_lost(record)
        raise _lost(record.id)

    def _destroy(self, record: SandboxRecord) -> None:
        self._stamped.pop(record.id, None)
        self._stop_vm(record)
        self.registry.remove(record.id)
        shutil.rmtree(self.snapshot_dir(record.id), ignore_errors=True)
        self._resume_lock(record.id).unlink(missing_ok=True)
        self.templates.release(record.template_id, self.registry)

    def _mark_lost(self, record: SandboxRecord) -> None:
        self._stop_vm(record)
        self.registry.set_state(record.id, LOST)

    def close(self) -> None:
        self.attachments.close()
        self.registry.close()


def _as_seen(record: SandboxRecord) -> SandboxRecord:
    """A sandbox being resumed is still frozen to its owner until it runs, one being frozen still running until it
    is frozen (the API knows no other states)."""
    if record.state == RESUMING:
        record.state = FROZEN
    elif record.state == FREEZING:
        record.state = RUNNING
    return record


def _vcpus(machine: dict[str, Any]) -> int:
    """The vCPUs of a machine as the registry keeps it (MachineConfig's default when it does not say)."""
    return int(machine.get("vcpus") or 1)


def _lost(sandbox_id: str) -> SandboxLostError:
    return SandboxLostError(f"sandbox {sandbox_id} was lost (its VM stopped); delete it and create a new one")


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Pieces of exactly `size` bytes (the last one shorter) from chunks of any size."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


@contextlib.contextmanager
def _code_locked(record: SandboxRecord, failure: str) -> Iterator[None]:
    """Hold the code lock for a fork or freeze; engine failures become service errors that start with `failure`."""
    lock_fd = attachments.take_code_lock(Path(record.vm_dir))
    try:
        yield
    except SandboxBusy as exc:
        raise Busy(str(exc)) from None
    except (EngineError, OSError) as exc:
        if _out_of_space(exc):  # the disk filled while the state was written: a documented 507, not a bug
            raise InsufficientStorage(f"{failure}: the disk it writes to is full ({exc})") from None
        raise ServiceError(f"{failure}: {exc}") from None
    finally:
        os.close(lock_fd)


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised here or reported by QEMU (whose migration error is text: strerror)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


def _fresh_vm_id(sandbox_id: str) -> str:
    """A resumed VM gets a new directory: the frozen one's files may still be on their way out."""
    return f"{sandbox_id}-{secrets.token_hex(2)}"


def _meminfo() -> dict[str, int]:
    """/proc/meminfo's fields in bytes ({} where there is none)."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields = value.split()
            if fields and fields[0].isdigit():
                info[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return info
