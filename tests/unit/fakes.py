"""A fake of the engine façade (service/engine/engine.py), for testing the real SandboxManager and the API above it
without VMs. It keeps no rules of its own: owners, limits, states, quotas, locks and error mapping are the real
manager's; the registry, the template store and the locks are real files under a temporary directory.

What it fakes is a VM: a directory (where the real locks live) and a Python namespace in this process, so state
persists between execs and is copied by a fork and kept by a freeze, as in a sandbox. A few magic snippets make
the failures a real sandbox can produce; knobs on the engine make its operations fail the way a real one can.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import itertools
import json
import pickle
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance_agent.frames import PAYLOAD_KEY

from service.engine import (
    EngineError,
    NetworkRequest,
    NetworkUnavailable,
    SandboxBusy,
    SandboxClosed,
    SandboxLost,
    SnapshotMismatch,
    SnapshotTampered,
    Template,
)
from service.engine.deployment_secret import read_or_create
from service.engine.machine import MachineConfig, machine_to_json
from service.engine.netpolicy import check_private_allow, parse_policy, resolve
from service.keys import derived_id
from service.manager import SandboxManager
from service.registry import Registry
from service.settings import ServiceConfig
from service.template_store import TemplateStore
from tests.configs import service_config

BUSY_CODE = "# busy"  # the agent answers that it is already running code
LOST_CODE = "# lose the vm"  # the VM dies after printing a line
CRASH_CODE = "# crash the service"  # something unexpected is raised mid-exec
CHUNKS_CODE = "# three chunks"  # stdout in three events, then a display, then a value
FAKE_PUBLIC_ADDRESS = "192.88.99.7"  # what every name resolves to here: public as far as the policy goes
FAKE_MEMORY_MIB = 256
KEY_A, KEY_B = "key-a", "key-b"
KEY_METRICS = "key-metrics"  # may read /metrics, nothing else
# The host the manager sees (its /proc/meminfo, in bytes): 8 GiB with 6 GiB available. The default reserve is then
# 2 GiB, and 4 × (8 - 2) GiB of guest memory may be committed.
HOST = {"MemTotal": 8 << 30, "MemAvailable": 6 << 30}


@dataclass
class _Vm:
    """A running fake VM: what its guest holds."""

    directory: Path
    machine: dict[str, Any]
    namespace: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)  # unfinished uploads, invisible until committed
    alive: bool = True


@dataclass(frozen=True)
class FakeEngineConfig:
    vcpus: int = 1
    memory_mib: int = FAKE_MEMORY_MIB


class FakeSandbox:
    """The Sandbox handle the manager holds: exec, calls, interrupt, detach, close."""

    def __init__(self, engine: FakeEngine, vm: _Vm) -> None:
        self._engine = engine
        self._vm = vm
        self.closed = False

    @property
    def vm_dir(self) -> Path:
        return self._vm.directory

    @property
    def running(self) -> bool:
        return self._vm.alive

    def exec_events(self, code: str, timeout_s: float | None = None, language: str = "python") -> Iterator[dict]:
        self._check()
        if code == BUSY_CODE:
            raise SandboxBusy()
        return self._events(code, language)

    def _events(self, code: str, language: str) -> Iterator[dict[str, Any]]:
        if code == LOST_CODE:
            yield {"ev": "stdout", "data": "about to die\n"}
            self._vm.alive = False
            raise SandboxLost("sandbox lost: the VM stopped")
        if code == CRASH_CODE:
            yield {"ev": "stdout", "data": "partial\n"}
            raise RuntimeError("boom: something the service did not expect")
        if code == CHUNKS_CODE:
            for i in range(3):
                yield {"ev": "stdout", "data": f"chunk {i}\n"}
            yield {"ev": "display", "data": {"text/plain": "<Figure>", "image/png": "iVBORw0KGgo="}}
            yield _done(value={"text/plain": "42"})
            return
        if language == "bash":
            yield {"ev": "stdout", "data": f"bash: {code}\n"}
            yield _done(exit_code=0)
            return
        yield from _run_python(self._vm.namespace, code)

    def interrupt(self) -> None:
        self._engine.interrupts.append(self._vm.directory.name.removeprefix("vm-"))

    def call(self, op: str, timeout_s: float = 10.0, payload: bytes = b"", **args: Any) -> dict[str, Any]:
        self._check()
        files, path = self._vm.files, args.get("path", "")
        if op == "file_write":
            self._engine.upload_chunk_sizes.append(len(payload))
            target = files if args.get("upload") is None else self._vm.uploads  # the guest's temporary name
            target[path] = (target.get(path, b"") if args.get("append") else b"") + payload
            return {"ev": "ok"}
        if op == "file_commit":  # the guest renames the finished upload over the file (or drops it)
            data = self._vm.uploads.pop(path, b"")
            if not args.get("abort"):
                files[path] = data
            return {"ev": "ok", "size": len(data)}
        if op == "file_read":
            if path not in files:
                return {"ev": "error", "code": "not_found", "message": f"no file {path!r}"}
            data, offset = files[path], args["offset"]
            chunk = data[offset: offset + args["max"]]
            return {"ev": "ok", "size": len(data), PAYLOAD_KEY: chunk, "eof": offset + len(chunk) >= len(data)}
        if op == "list_dir":
            prefix = path.rstrip("/") + "/"
            entries = [{"name": name[len(prefix):], "type": "file", "size": len(data), "mtime": 0.0}
                       for name, data in sorted(files.items())
                       if name.startswith(prefix) and "/" not in name[len(prefix):]
                       and name[len(prefix):] > args.get("after", "")]
            more, entries = len(entries) > args["limit"], entries[:args["limit"]]
            return {"ev": "ok", "entries": entries, "more": more, "after": entries[-1]["name"] if more else None}
        return {"ev": "ok"}

    def detach(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True
        self._engine.stop(self._vm.directory, self._vm.machine)

    def _check(self) -> None:
        if self.closed:
            raise SandboxClosed("the sandbox is closed")
        if not self._vm.alive:
            raise SandboxLost("sandbox lost: the VM is not running")


class FakeEngine:
    def __init__(self, run_dir: Path) -> None:
        self.config = FakeEngineConfig()
        self.templates_dir = run_dir / "templates"
        self.sandboxes_dir = run_dir / "sandboxes"
        self.vms: dict[Path, _Vm] = {}  # every running VM, whichever manager ("process") started it
        self.interrupts: list[str] = []  # sandbox ids whose code was interrupted
        self.upload_chunk_sizes: list[int] = []
        self.fail_next_fork = False  # the fork fails half way: nothing new may be left behind
        self.fail_next_snapshot = False  # a named snapshot fails: the sandbox keeps running, no snapshot stays
        self.unrestorable: set[str] = set()  # sandbox ids whose snapshot this "host" cannot restore
        self.tampered: set[str] = set()  # sandbox ids whose snapshot fails authentication
        self.network_unavailable: str | None = None
        self._ids = itertools.count(1)

    # ---- templates ----
    def publish_template(self, store: TemplateStore, warm: dict[str, Any] | None = None) -> Template:
        """A warm template as the pool keeper publishes it (its files, its pointer)."""
        template = self._template(warm or {})
        store.publish(template)
        return template

    def unpublish_template(self, store: TemplateStore) -> None:
        (store.directory / "current.json").unlink(missing_ok=True)

    def _template(self, namespace: dict[str, Any]) -> Template:
        directory = self.templates_dir / f"tpl-{secrets.token_hex(4)}"
        directory.mkdir(parents=True)
        machine = MachineConfig(kernel=Path("/fake/vmlinuz"), initrd=Path("/fake/initrd"), rootfs=Path("/fake/root"),
                                accelerator="tcg", memory_mib=self.config.memory_mib, agent_ports=4,
                                memory_file=directory / "memory", memory_shared=False)
        (directory / "memory").write_bytes(pickle.dumps(_plain(namespace)))
        (directory / "devstate").write_bytes(b"")
        (directory / "template.json").write_text(json.dumps(machine_to_json(machine)))
        return Template(directory, machine)

    def _start(self, vm_id: str, machine: dict[str, Any], namespace: dict[str, Any],
               files: dict[str, bytes] | None = None) -> FakeSandbox:
        directory = self.sandboxes_dir / f"vm-{vm_id}"
        directory.mkdir(parents=True)
        vm = _Vm(directory, machine, namespace, dict(files or {}))
        self.vms[directory] = vm
        return FakeSandbox(self, vm)

    # ---- the façade ----
    def clone(self, template: Template, vm_id: str) -> FakeSandbox:
        namespace = pickle.loads((template.directory / "memory").read_bytes())
        return self._start(vm_id, machine_to_json(template.machine), namespace)

    def boot(self, vcpus: int | None = None, memory_mib: int | None = None, die_with_parent: bool = False,
             detach: bool = False, vm_id: str | None = None, agent_ports: int = 1) -> FakeSandbox:
        machine = {"vcpus": vcpus or 1, "memory_mib": memory_mib or self.config.memory_mib, "agent_ports": agent_ports}
        return self._start(vm_id or f"boot-{next(self._ids)}", machine, {})

    def fork(self, sandbox: FakeSandbox, vm_ids: list[str], networked: bool) -> tuple[Template, list[FakeSandbox]]:
        source = self.vms[sandbox.vm_dir]
        if self.fail_next_fork:
            self.fail_next_fork = False
            raise EngineError("injected: the copies did not start")
        template = self._template({})
        return template, [self._start(vm_id, source.machine, _copy_namespace(source.namespace), source.files)
                          for vm_id in vm_ids]

    def snapshot(self, sandbox: FakeSandbox, networked: bool) -> Template:
        vm = self.vms[sandbox.vm_dir]
        if self.fail_next_snapshot:
            self.fail_next_snapshot = False
            raise EngineError("injected: the state was not written")
        return self._template(_copy_namespace(vm.namespace))

    def template(self, template_id: str) -> Template:
        return Template.load(self.templates_dir / template_id)

    def freeze(self, sandbox: FakeSandbox, directory: Path, compress: bool, networked: bool) -> None:
        vm = self.vms[sandbox.vm_dir]
        directory.mkdir(parents=True)
        with open(directory / "state", "wb") as state:  # as large as the guest's RAM, as a full stream can be
            pickle.dump((vm.machine, _plain(vm.namespace), vm.files), state)
            state.truncate(vm.machine["memory_mib"] << 20)
        self.stop(vm.directory, vm.machine)

    def resume(self, directory: Path, vm_id: str) -> FakeSandbox:
        sandbox_id = directory.name
        if sandbox_id in self.unrestorable:
            raise SnapshotMismatch("snapshot made with QEMU release '7.2'; this host has '10.0'")
        if sandbox_id in self.tampered:
            raise SnapshotTampered(f"snapshot {sandbox_id} fails authentication")
        with open(directory / "state", "rb") as state:
            machine, namespace, files = pickle.load(state)
        return self._start(vm_id, machine, namespace, files)

    def connect(self, vm_dir: Path, machine_json: dict[str, Any], port: int) -> FakeSandbox:
        vm = self.vms.get(vm_dir)
        if vm is None or not vm.alive:
            raise SandboxLost(f"the VM in {vm_dir.name} is not running")
        return FakeSandbox(self, vm)

    def is_running(self, vm_dir: Path, machine_json: dict[str, Any]) -> bool:
        vm = self.vms.get(vm_dir)
        return vm is not None and vm.alive

    def stop(self, vm_dir: Path, machine_json: dict[str, Any]) -> None:
        vm = self.vms.pop(vm_dir, None)
        if vm is not None:
            vm.alive = False
        shutil.rmtree(vm_dir, ignore_errors=True)

    def unowned_vm_dirs(self, owned_ids: set[str], min_age_s: float) -> list[Path]:
        """Running fake VMs whose dir names no owned id (no age here: the fake's VMs are made by the test)."""
        return [vm_dir for vm_dir in self.vms
                if not ({vm_dir.name.removeprefix("vm-"), vm_dir.name.removeprefix("vm-").rsplit("-", 1)[0]}
                        & owned_ids)]

    def stop_dir(self, vm_dir: Path) -> None:
        self.stop(vm_dir, {})

    @staticmethod
    def machine_json(sandbox: FakeSandbox) -> dict[str, Any]:
        return sandbox._vm.machine

    @staticmethod
    def memory_mib(machine_json: dict[str, Any]) -> int:
        return int(machine_json["memory_mib"])

    @staticmethod
    def agent_ports(machine_json: dict[str, Any]) -> int:
        return int(machine_json.get("agent_ports", 4))

    def network_request(self, requested: dict[str, Any] | None, settings: Any) -> NetworkRequest | None:
        policy = parse_policy(None if requested is None else {"egress": requested.get("egress")})
        if policy is None:
            return None
        if self.network_unavailable is not None:
            raise NetworkUnavailable(self.network_unavailable)
        return NetworkRequest(policy, resolve(policy, resolver=lambda name: [FAKE_PUBLIC_ADDRESS],
                                              private_allow=check_private_allow(settings.private_allow)))

    def give_network(self, sandbox: FakeSandbox, request: NetworkRequest, settings: Any) -> dict[str, Any]:
        return {**request.policy.to_json(), "mac": "02:00:00:00:00:01", "address": "100.96.0.14",
                "host_address": "100.96.0.13"}

    def remove_network_leftovers(self) -> list[str]:
        return []


def _done(value: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
          exit_code: int | None = None) -> dict[str, Any]:
    return {"ev": "done", "value": value, "error": error, "exit_code": exit_code, "truncated_bytes": 0,
            "worker_restarted": False, "worker_exit": None, "duration_s": 0.001}


def _run_python(namespace: dict[str, Any], code: str) -> Iterator[dict[str, Any]]:
    """The REPL's contract: stdout, then the value of a trailing expression or the error."""
    out = io.StringIO()
    value, error = None, None
    try:
        tree = ast.parse(code)
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            tree.body.pop()
        with contextlib.redirect_stdout(out):
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                result = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                if result is not None:
                    value = {"text/plain": repr(result)}
    except Exception as exc:
        error = {"name": type(exc).__name__, "value": str(exc), "traceback": f"{type(exc).__name__}: {exc}"}
    if out.getvalue():
        yield {"ev": "stdout", "data": out.getvalue()}
    yield _done(value=value, error=error)


def _plain(namespace: dict[str, Any]) -> dict[str, Any]:
    """What of a namespace a snapshot keeps here (a real one keeps the whole process; tests use plain values)."""
    return {name: value for name, value in namespace.items() if name != "__builtins__"}


def _copy_namespace(namespace: dict[str, Any]) -> dict[str, Any]:
    """What a fork does to a process: every object copied (modules, which cannot be, are shared)."""
    copied = {}
    for name, value in namespace.items():
        if name == "__builtins__":
            continue
        try:
            copied[name] = copy.deepcopy(value)
        except TypeError:
            copied[name] = value
    return copied


def make_config(tmp: Path, **service: Any) -> ServiceConfig:
    """The service's config for tests, keys KEY_A and KEY_B, with small limits the tests can cross (3 sandboxes
    per key, room for 2 frozen ones of this engine's 256 MiB); `service` overrides more of the spec's [service]."""
    limits = {"max_body_bytes": 4096, "max_code_bytes": 1024, "max_file_bytes": 64 << 10,
              "max_sandboxes_per_key": 3, "frozen_quota_bytes": 600 << 20, "metrics_keys": [KEY_METRICS]}
    return service_config(tmp / "image", [KEY_A, KEY_B], paths={"run_dir": tmp / "run", "state_dir": tmp / "state"},
                          service=limits | service)


def key_id(config: ServiceConfig, key: str) -> str:
    """The id (the owner of its sandboxes) the service gives a configured key under this config's secret."""
    return derived_id(read_or_create(config.secret_file), key)


def states(manager: SandboxManager) -> dict[str, str]:
    """Every sandbox the registry holds (any key), and its state."""
    return {record.id: record.state for record in manager.registry.list()}


def fake_manager(config: ServiceConfig, warm: dict[str, Any] | None = None) -> tuple[SandboxManager, FakeEngine]:
    """The real manager over a fake engine, with a published warm template (so creates are served), its registry
    and template store real files under the config's directories."""
    engine = FakeEngine(config.run_dir)
    manager = SandboxManager(config, engine=engine, registry=Registry(config.registry_path),  # type: ignore[arg-type]
                             host_meminfo=lambda: dict(HOST))
    engine.publish_template(manager.templates, warm)
    return manager, engine
