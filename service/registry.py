"""The sandbox registry: one SQLite file in the state directory, shared by every API worker and the pool keeper.

Any worker can serve any sandbox because everything needed to reach one is here (its VM directory holds its
sockets and pidfile). SQLite in WAL mode gives atomic claims across processes: two creates never get the same
pooled clone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

POOLED, RUNNING, FROZEN, LOST = "pooled", "running", "frozen", "lost"
# A place reserved for a sandbox being made (create, fork): counted against the limits and the host's memory from
# the moment it is admitted, so concurrent requests cannot all pass a check made before any of them is stored.
# Nobody sees it; it becomes RUNNING, or is released.
CREATING = "creating"
# A frozen sandbox whose resume was admitted (in the same transaction as the limits and capacity checks) and is
# under way: it counts as live. A failed resume gives it back to FROZEN; so does the pool keeper if the process
# that resumed it died (stale_reservations / release). The API shows it as frozen until it runs.
RESUMING = "resuming"
# A running sandbox whose freeze was admitted (in one transaction with the frozen share, quota and free disk checks)
# and is under way: its VM still runs (it counts as live) and its state counts as frozen for the next admission, so
# two concurrent freezes cannot both pass a check made before either is stored. A failed freeze gives it back to
# RUNNING; so does the pool keeper if the process that froze it died. The API shows it as running until it is frozen.
FREEZING = "freezing"
STATES = (POOLED, CREATING, RESUMING, FREEZING, RUNNING, FROZEN, LOST)
# States whose VM is (or is about to be) running: what limits, committed memory and vCPUs count.
LIVE = (RUNNING, CREATING, RESUMING, FREEZING)
# States whose memory is (or is about to be) written to a snapshot: what a key's frozen share counts.
HELD_FROZEN = (FROZEN, RESUMING, FREEZING)
# A named snapshot (table snapshots) is "freezing" while its state is written, then "ready".
READY = "ready"
# The owner of a template an operator published (`appliance templates publish`): every key may create from it.
PUBLIC = ""
# How stale a sandbox's last_active_at may be. Execs and file calls do not write the registry each time: each API
# worker writes a sandbox's last use only when its own previous write for it is at least this old (see
# SandboxManager._mark_used). So every use is at most this long after a stamp some worker wrote, and the registry's
# value (the largest any worker wrote) is never more than this behind the real last use, whichever worker served it.
# idle_since adds it to every idle lifetime: no sandbox is closed or frozen while any worker used it within its
# timeout_s; the price is that an idle one goes up to this much later.
TOUCH_EVERY_S = 5.0


def is_busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite giving up on a lock another process held for longer than the connection waits (30 s):
    an operator's `sqlite3` shell in a transaction, a backup tool. The call can be retried; it is not a bug."""
    return isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc) for word in ("database is locked", "database is busy", "database table is locked"))


@dataclass(frozen=True)
class Limits:
    """What one admission is checked against: live sandboxes per key and on the host, and the configured guest
    memory and vCPUs of all live and pooled VMs (None: not limited, the host's size is unknown)."""

    per_key: int
    host: int
    memory_mib: float | None
    vcpus: float | None


class Full(Exception):
    """A reservation was refused: `what` names the limit (per_key, host, memory, vcpus; for frozen state
    frozen_share, disk, quota), the message says by how much."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


class NameTaken(Exception):
    """A named snapshot (or template) of that name exists already for that owner."""


@dataclass(frozen=True)
class FrozenRoom:
    """What a freeze or a named snapshot is checked against, with what the caller measured just before: the key's
    share (service.max_frozen_per_key), the free space where the state will be written, the bytes frozen state
    already uses on disk and the quota for all of it (service.frozen_quota_bytes)."""

    share: int
    free_mib: int
    used_bytes: int
    quota_bytes: int
    margin_mib: int

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT,                -- id of the API key that created it (service/keys.py); NULL while pooled
    state TEXT NOT NULL,
    vm_dir TEXT NOT NULL,
    template_id TEXT,
    machine TEXT NOT NULL,     -- JSON of the MachineConfig (to attach, save and restore)
    timeout_s REAL NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    last_active_at REAL NOT NULL,
    persistent INTEGER NOT NULL DEFAULT 0,  -- idle past timeout_s: freeze (1) instead of close (0)
    network TEXT               -- JSON: the network policy and the current identity (mac, address); NULL: none
);
CREATE INDEX IF NOT EXISTS sandboxes_owner ON sandboxes(owner, state);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
CREATE TABLE IF NOT EXISTS snapshots (
    owner TEXT NOT NULL,       -- key id of its owner; '' (PUBLIC): a template every key may create from
    name TEXT NOT NULL,        -- the owner's name for it (snapshot_names.py checks it)
    state TEXT NOT NULL,       -- freezing (being written) | ready
    template_id TEXT,          -- the template (run_dir/templates/<id>) holding its RAM and device files
    machine TEXT NOT NULL,     -- JSON of the source's MachineConfig size: memory_mib, vcpus
    source TEXT,               -- the sandbox it was taken of
    size_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


@dataclass
class SandboxRecord:
    id: str
    owner: str | None
    state: str
    vm_dir: str
    template_id: str | None
    machine: dict[str, Any]
    timeout_s: float
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    last_active_at: float = 0.0
    persistent: bool = False
    # {"egress": ..., "mac": ..., "address": ...}: the policy as the user gave it, plus the network identity of the
    # VM now running (new on every fork and resume). None: the sandbox has no network at all.
    network: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SandboxRecord:
        data = dict(row)
        data["machine"] = json.loads(data["machine"])
        data["metadata"] = json.loads(data["metadata"])
        data["persistent"] = bool(data["persistent"])
        data["network"] = None if data.get("network") is None else json.loads(data["network"])
        return cls(**data)


@dataclass
class SnapshotRecord:
    """A named snapshot of a key (or, owner PUBLIC, a published template): the live state of a sandbox as a
    template that new sandboxes are cloned from."""

    owner: str
    name: str
    state: str
    template_id: str | None
    machine: dict[str, Any]
    source: str | None = None
    size_bytes: int = 0
    created_at: float = 0.0

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> SnapshotRecord:
        data = dict(row)
        data["machine"] = json.loads(data["machine"])
        return cls(**data)


class Registry:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made 0600 before SQLite opens it (its -wal and -shm files take the same mode): it holds key hashes,
        # whatever the process's umask.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        self.path = path
        # One connection per thread: API workers serve requests on several threads, and a connection's
        # transaction is shared by every thread using it (BEGIN in one thread fails while another is in one).
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._db.executescript(_SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(sandboxes)")}
        if "network" not in columns:  # a registry from before sandbox networks
            self._db.execute("ALTER TABLE sandboxes ADD COLUMN network TEXT")

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def owners(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT owner FROM sandboxes WHERE owner IS NOT NULL")]

    def migrate_owners(self, owners: dict[str, str]) -> int:
        """Rows owned by an old owner value (a registry from before key ids: the SHA-256 of the key) move to the new
        one (the key id), in one transaction; returns how many moved. Idempotent: run on every open."""
        moved = 0
        if not owners:  # the usual case: no write lock taken at every worker's start
            return moved
        with self._transaction() as db:
            for old, new in owners.items():
                moved += db.execute("UPDATE sandboxes SET owner=? WHERE owner=?", (new, old)).rowcount
        return moved

    def close(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, record: SandboxRecord) -> None:
        """Store a new record; unset timestamps become now, in the record too (callers return it to clients)."""
        now = time.time()
        record.created_at = record.created_at or now
        record.last_active_at = record.last_active_at or now
        self._insert(self._db, record)

    @staticmethod
    def _insert(db: sqlite3.Connection, record: SandboxRecord) -> None:
        now = time.time()
        record.created_at = record.created_at or now
        record.last_active_at = record.last_active_at or now
        db.execute(
            "INSERT INTO sandboxes (id, owner, state, vm_dir, template_id, machine, timeout_s, metadata, "
            "created_at, last_active_at, persistent, network) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                record.id, record.owner, record.state, record.vm_dir, record.template_id,
                json.dumps(record.machine), record.timeout_s, json.dumps(record.metadata),
                record.created_at, record.last_active_at, int(record.persistent),
                None if record.network is None else json.dumps(record.network),
            ),
        )

    def reserve(self, records: list[SandboxRecord], limits: Limits) -> None:
        """Admit and store `records` (state CREATING, one owner) in one transaction: refused with Full if they do
        not fit `limits`."""
        with self._transaction() as db:
            self._check_room(db, records[0].owner, [record.machine for record in records], limits)
            for record in records:
                record.state = CREATING
                self._insert(db, record)

    def reserve_resume(self, sandbox_id: str, limits: Limits) -> bool:
        """Admit the resume of a frozen sandbox in one transaction: it becomes RESUMING (live, counted) or Full is
        raised. False if it is not frozen (any more). The caller holds the sandbox's resume lock, so a RESUMING
        record it finds was left by a process that died resuming it, and is admitted again like a frozen one."""
        with self._transaction() as db:
            row = db.execute("SELECT owner, state, machine FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is None or row["state"] not in (FROZEN, RESUMING):
                return False
            self._check_room(db, row["owner"], [json.loads(row["machine"])], limits, besides=sandbox_id)
            db.execute("UPDATE sandboxes SET state=?, last_active_at=? WHERE id=?", (RESUMING, time.time(), sandbox_id))
        return True

    @staticmethod
    def _check_room(db: sqlite3.Connection, owner: str | None, machines: list[dict[str, Any]], limits: Limits,
                    besides: str = "") -> None:
        """Full unless `machines` more VMs of `owner` fit `limits` (inside the caller's transaction; the record
        `besides` is not counted: it is the one being admitted)."""
        marks = ",".join("?" * len(LIVE))
        adding = len(machines)
        mine = db.execute(f"SELECT COUNT(*) FROM sandboxes WHERE owner=? AND state IN ({marks}) AND id!=?",
                          (owner, *LIVE, besides)).fetchone()[0]
        if mine + adding > limits.per_key:
            raise Full("per_key", f"this key already holds {mine} of its {limits.per_key} sandboxes")
        total = db.execute(f"SELECT COUNT(*) FROM sandboxes WHERE state IN ({marks}) AND id!=?",
                           (*LIVE, besides)).fetchone()[0]
        if total + adding > limits.host:
            raise Full("host", f"this host runs {total} of its {limits.host} sandboxes")
        memory, vcpus = Registry._committed(db, besides)
        wanted = sum(int(machine["memory_mib"]) for machine in machines)
        if limits.memory_mib is not None and memory + wanted > limits.memory_mib:
            raise Full("memory", f"{memory} MiB of guest memory is committed on this host, {wanted} MiB more would "
                                 f"pass its {limits.memory_mib:.0f} MiB")
        wanted = sum(int(machine.get("vcpus") or 1) for machine in machines)
        if limits.vcpus is not None and vcpus + wanted > limits.vcpus:
            raise Full("vcpus", f"{vcpus} vCPUs are committed on this host, {wanted} more would pass its "
                                f"{limits.vcpus:.0f}")

    def reserve_freeze(self, sandbox_id: str, memory_mib: int, room: FrozenRoom) -> bool:
        """Admit the freeze of a running sandbox in one transaction: it becomes FREEZING (its state counted as
        frozen from now on) or Full is raised. False if it is not running (frozen, or being frozen, already)."""
        with self._transaction() as db:
            row = db.execute("SELECT owner, state FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
            if row is None or row["state"] != RUNNING:
                return False
            self._check_frozen_room(db, row["owner"], memory_mib, room)
            db.execute("UPDATE sandboxes SET state=?, last_active_at=? WHERE id=?", (FREEZING, time.time(), sandbox_id))
        return True

    def reserve_snapshot(self, snapshot: SnapshotRecord, room: FrozenRoom) -> None:
        """Admit a named snapshot in one transaction, like reserve_freeze: its row is stored as freezing (counted
        in the owner's share and the quota) or Full (NameTaken) is raised."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE owner=? AND name=?", (snapshot.owner, snapshot.name)
                          ).fetchone() is not None:
                raise NameTaken(snapshot.name)
            self._check_frozen_room(db, snapshot.owner, int(snapshot.machine["memory_mib"]), room)
            snapshot.state, snapshot.created_at = FREEZING, time.time()
            self._insert_snapshot(db, snapshot)

    @staticmethod
    def _check_frozen_room(db: sqlite3.Connection, owner: str | None, memory_mib: int, room: FrozenRoom) -> None:
        """Full unless one more frozen state of `memory_mib` of `owner` fits `room`, counting the freezes and
        snapshots admitted and not yet written (inside the caller's transaction)."""
        marks = ",".join("?" * len(HELD_FROZEN))
        held = db.execute(f"SELECT COUNT(*) FROM sandboxes WHERE owner=? AND state IN ({marks})",
                          (owner, *HELD_FROZEN)).fetchone()[0]
        held += db.execute("SELECT COUNT(*) FROM snapshots WHERE owner=?", (owner,)).fetchone()[0]
        if held >= room.share:
            raise Full("frozen_share", f"this key already holds {room.share} frozen sandboxes")
        pending = db.execute("SELECT COALESCE(SUM(json_extract(machine, '$.memory_mib')), 0) FROM sandboxes "
                             "WHERE state=?", (FREEZING,)).fetchone()[0]
        pending += db.execute("SELECT COALESCE(SUM(json_extract(machine, '$.memory_mib')), 0) FROM snapshots "
                              "WHERE state=?", (FREEZING,)).fetchone()[0]
        need_mib = memory_mib + room.margin_mib
        if room.free_mib - pending < need_mib:
            raise Full("disk", f"need {need_mib} MiB, {room.free_mib - pending} MiB free"
                               + (f" ({pending} MiB of it promised to freezes under way)" if pending else ""))
        kept = db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM (SELECT DISTINCT template_id, size_bytes "
                          "FROM snapshots WHERE state=?)", (READY,)).fetchone()[0]
        used = room.used_bytes + kept + (pending << 20)
        if used + (memory_mib << 20) > room.quota_bytes:
            raise Full("quota", f"frozen sandboxes and snapshots use {used >> 20} MiB of the "
                                f"{room.quota_bytes >> 20} MiB quota and this one may need up to {memory_mib} MiB")

    @staticmethod
    def _committed(db: sqlite3.Connection, besides: str = "") -> tuple[int, int]:
        """(guest memory in MiB, vCPUs) configured for every live and pooled VM but `besides`."""
        marks = ",".join("?" * (len(LIVE) + 1))
        memory, vcpus = db.execute(
            "SELECT COALESCE(SUM(json_extract(machine, '$.memory_mib')), 0), "
            "COALESCE(SUM(COALESCE(json_extract(machine, '$.vcpus'), 1)), 0) "
            f"FROM sandboxes WHERE state IN ({marks}) AND id!=?", (*LIVE, POOLED, besides)).fetchone()
        return memory, vcpus

    def committed_mib(self) -> int:
        """Configured guest memory of every live and pooled sandbox."""
        return self._committed(self._db)[0]

    def committed_vcpus(self) -> int:
        """vCPUs of every live and pooled sandbox."""
        return self._committed(self._db)[1]

    def complete(self, record: SandboxRecord) -> None:
        """A reserved place becomes the running sandbox `record` describes."""
        record.state = RUNNING
        record.last_active_at = time.time()
        self._db.execute(
            "UPDATE sandboxes SET state=?, vm_dir=?, template_id=?, machine=?, last_active_at=?, network=? "
            "WHERE id=? AND state=?",
            (RUNNING, record.vm_dir, record.template_id, json.dumps(record.machine), record.last_active_at,
             None if record.network is None else json.dumps(record.network), record.id, CREATING),
        )

    def release(self, sandbox_ids: list[str]) -> None:
        """Give back places reserved for sandboxes that were not made, or not resumed (those stay frozen), or not
        frozen (those keep running)."""
        for sandbox_id in sandbox_ids:
            self._db.execute("DELETE FROM sandboxes WHERE id=? AND state=?", (sandbox_id, CREATING))
            self._db.execute("UPDATE sandboxes SET state=? WHERE id=? AND state=?", (FROZEN, sandbox_id, RESUMING))
            self._db.execute("UPDATE sandboxes SET state=? WHERE id=? AND state=?", (RUNNING, sandbox_id, FREEZING))

    def claim_pooled(
        self, owner: str, template_id: str, timeout_s: float, metadata: dict[str, Any], persistent: bool = False,
        reserved_id: str | None = None,
    ) -> SandboxRecord | None:
        """Atomically hand one pooled clone of `template_id` to `owner`, giving back the place `reserved_id` held
        for it; None if the pool is empty (the reservation stays)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM sandboxes WHERE state=? AND template_id=? ORDER BY created_at LIMIT 1",
                (POOLED, template_id),
            ).fetchone()
            if row is None:
                return None
            if reserved_id is not None:
                db.execute("DELETE FROM sandboxes WHERE id=? AND state=?", (reserved_id, CREATING))
            now = time.time()
            db.execute(
                "UPDATE sandboxes SET owner=?, state=?, timeout_s=?, metadata=?, created_at=?, last_active_at=?, "
                "persistent=? WHERE id=?",
                (owner, RUNNING, timeout_s, json.dumps(metadata), now, now, int(persistent), row["id"]),
            )
        record = SandboxRecord.from_row(row)
        record.owner, record.state, record.timeout_s, record.metadata = owner, RUNNING, timeout_s, metadata
        record.persistent = persistent
        record.created_at = record.last_active_at = now
        return record

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute("SELECT * FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return None if row is None else SandboxRecord.from_row(row)

    def list(self, owner: str | None = None, state: str | None = None) -> list[SandboxRecord]:
        query, args = "SELECT * FROM sandboxes WHERE 1=1", []
        if owner is not None:
            query += " AND owner=?"
            args.append(owner)
        if state is not None:
            query += " AND state=?"
            args.append(state)
        rows = self._db.execute(query + " ORDER BY created_at", args).fetchall()
        return [SandboxRecord.from_row(row) for row in rows]

    def count(self, owner: str | None = None, states: tuple[str, ...] = LIVE) -> int:
        marks = ",".join("?" * len(states))
        if owner is None:
            return self._db.execute(f"SELECT COUNT(*) FROM sandboxes WHERE state IN ({marks})", states).fetchone()[0]
        return self._db.execute(
            f"SELECT COUNT(*) FROM sandboxes WHERE owner=? AND state IN ({marks})", (owner, *states)
        ).fetchone()[0]

    def counts_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM sandboxes GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {row[0]: row[1] for row in rows}

    def touch(self, sandbox_id: str, at: float | None = None) -> None:
        """The sandbox was used at `at` (default now). Never moves last_active_at back: workers write their own
        stamps, late or not (TOUCH_EVERY_S)."""
        self._db.execute("UPDATE sandboxes SET last_active_at=MAX(last_active_at, ?) WHERE id=?",
                         (time.time() if at is None else at, sandbox_id))

    def set_state(self, sandbox_id: str, state: str, **columns: Any) -> None:
        """Change state (and other columns, e.g. vm_dir or machine after a resume)."""
        sets = ", ".join(["state=?", *[f"{name}=?" for name in columns]])
        values = [json.dumps(v) if name in {"machine", "metadata", "network"} and v is not None else v
                  for name, v in columns.items()]
        self._db.execute(f"UPDATE sandboxes SET {sets} WHERE id=?", (state, *values, sandbox_id))

    def set_timeout(self, sandbox_id: str, timeout_s: float, now: float) -> None:
        """A new idle period, counted from `now` at the latest (E2B's set_timeout); the state is not touched."""
        self._db.execute("UPDATE sandboxes SET timeout_s=?, last_active_at=MAX(last_active_at, ?) WHERE id=?",
                         (timeout_s, now, sandbox_id))

    def remove(self, sandbox_id: str) -> bool:
        return self._db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,)).rowcount > 0

    def stale_reservations(self, older_than: float) -> list[SandboxRecord]:
        """Places reserved before `older_than` (a timestamp) and never completed or resumed: their request's process
        died (release gives them back)."""
        rows = self._db.execute("SELECT * FROM sandboxes WHERE (state=? AND created_at < ?) OR "
                                "(state IN (?, ?) AND last_active_at < ?)",
                                (CREATING, older_than, RESUMING, FREEZING, older_than)).fetchall()
        return [SandboxRecord.from_row(row) for row in rows]

    def idle_since(self, cutoff_for: float) -> list[SandboxRecord]:
        """Running sandboxes whose idle lifetime has passed at time `cutoff_for`, whichever worker used them last
        (last_active_at may be up to TOUCH_EVERY_S behind: see there)."""
        rows = self._db.execute(
            "SELECT * FROM sandboxes WHERE state=? AND last_active_at + timeout_s < ?",
            (RUNNING, cutoff_for - TOUCH_EVERY_S),
        ).fetchall()
        return [SandboxRecord.from_row(row) for row in rows]

    # ---- named snapshots and published templates ----------------------------------------------------------------

    @staticmethod
    def _insert_snapshot(db: sqlite3.Connection, snapshot: SnapshotRecord) -> None:
        db.execute("INSERT INTO snapshots (owner, name, state, template_id, machine, source, size_bytes, created_at) "
                   "VALUES (?,?,?,?,?,?,?,?)",
                   (snapshot.owner, snapshot.name, snapshot.state, snapshot.template_id,
                    json.dumps(snapshot.machine), snapshot.source, snapshot.size_bytes, snapshot.created_at))

    def complete_snapshot(self, snapshot: SnapshotRecord) -> None:
        """A snapshot admitted by reserve_snapshot is written: it becomes ready."""
        snapshot.state = READY
        self._db.execute("UPDATE snapshots SET state=?, template_id=?, size_bytes=? WHERE owner=? AND name=?",
                         (READY, snapshot.template_id, snapshot.size_bytes, snapshot.owner, snapshot.name))

    def snapshot(self, owner: str, name: str) -> SnapshotRecord | None:
        row = self._db.execute("SELECT * FROM snapshots WHERE owner=? AND name=?", (owner, name)).fetchone()
        return None if row is None else SnapshotRecord.from_row(row)

    def snapshots(self, owner: str | None = None) -> list[SnapshotRecord]:
        """Every snapshot of `owner` (PUBLIC: the published templates; None: all), oldest first."""
        query, args = "SELECT * FROM snapshots", ()
        if owner is not None:
            query, args = query + " WHERE owner=?", (owner,)
        return [SnapshotRecord.from_row(row) for row in self._db.execute(query + " ORDER BY created_at", args)]

    def publish_snapshot(self, snapshot: SnapshotRecord, template_name: str) -> SnapshotRecord:
        """A PUBLIC row for the ready `snapshot`'s template under `template_name` (NameTaken if one exists). It
        shares the snapshot's files, which stay until no row and no sandbox uses them."""
        public = replace(snapshot, owner=PUBLIC, name=template_name, state=READY, created_at=time.time())
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM snapshots WHERE owner=? AND name=?", (PUBLIC, template_name)
                          ).fetchone() is not None:
                raise NameTaken(template_name)
            self._insert_snapshot(db, public)
        return public

    def remove_snapshot(self, owner: str, name: str) -> bool:
        return self._db.execute("DELETE FROM snapshots WHERE owner=? AND name=?", (owner, name)).rowcount > 0

    def stale_snapshots(self, older_than: float) -> list[SnapshotRecord]:
        """Snapshots admitted before `older_than` and never written: their request's process died."""
        rows = self._db.execute("SELECT * FROM snapshots WHERE state=? AND created_at < ?",
                                (FREEZING, older_than)).fetchall()
        return [SnapshotRecord.from_row(row) for row in rows]

    def template_ids(self) -> set[str]:
        """Every template some sandbox maps or some snapshot or published template holds."""
        rows = self._db.execute("SELECT template_id FROM sandboxes UNION SELECT template_id FROM snapshots")
        return {row[0] for row in rows if row[0] is not None}
