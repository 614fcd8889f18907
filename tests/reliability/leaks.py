"""What a live service holds on the host, counted so that a test can compare before and after a fault or a soak:
QEMU processes, VM dirs, sockets and files under its run dir, its cgroups, its network namespaces, taps and host
veths, its snapshots, the open fds and RSS of each of its processes, and its registry.

Everything is scoped to one service: QEMUs by the service's run dir on their command line, cgroups by the
service's own cgroup name (the test gives each service one), namespaces by the slots the service claimed (its
run dir's `.netslots`) and by what it ever claimed (kept in `Inventory.slots_seen`), processes by parentage.
Nothing here kills or changes anything.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from service.engine.jail import cgroup_layout
from service.engine.netpolicy import NETNS_PREFIX
from tests.live_service import LiveService, children_of, rss_kib
from tests.vmtools import qemu_pids_under

NETNS_DIR = Path("/run/netns")
HOST_VETH_PREFIX = "aplsb"  # netpolicy.Slot.host_veth: aplsb<N>h


@dataclass
class Snapshot:
    """One count of everything; `orphans` names what nobody owns (the registry does not know it)."""

    qemus: int
    vm_dirs: int
    sockets: int
    run_files: int
    run_kib: int  # tmpfs blocks the run dir uses
    cgroups: int
    netns: int
    taps: int
    veths: int
    snapshots: int
    registry_rows: dict[str, int]
    registry_bytes: int
    fds: dict[str, int]  # per service process: master, worker-N, keeper
    rss_kib: dict[str, int]
    orphans: list[str] = field(default_factory=list)

    def resources(self) -> dict[str, int]:
        """The host resources (not the service's processes): what a fault must not leave behind."""
        return {"qemus": self.qemus, "vm_dirs": self.vm_dirs, "sockets": self.sockets, "cgroups": self.cgroups,
                "netns": self.netns, "taps": self.taps, "veths": self.veths, "snapshots": self.snapshots}


class Inventory:
    def __init__(self, service: LiveService, cgroup_name: str) -> None:
        self.service = service
        self.cgroup_name = cgroup_name
        self.slots_seen: set[int] = set()  # every slot this service was seen to claim

    # ---- the parts -------------------------------------------------------------------------------------------

    def _registry(self) -> list[tuple[str, str, str]]:
        """(id, state, vm_dir) of every row; [] if it cannot be read right now."""
        path = self.service.state_dir / "registry.sqlite3"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return [tuple(row) for row in db.execute("SELECT id, state, vm_dir FROM sandboxes")]
        finally:
            db.close()

    def cgroup_dirs(self) -> list[Path]:
        """The per-VM cgroups below this service's cgroup parent, in every controller hierarchy (v1) or once (v2)."""
        pid = self.service.master_pid if self.service.process and self.service.process.poll() is None else os.getpid()
        try:
            layout = cgroup_layout(Path("/proc/self/mountinfo").read_text(), Path(f"/proc/{pid}/cgroup").read_text())
        except OSError:
            layout = cgroup_layout(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
        found: list[Path] = []
        for own in set(layout.own.values()):
            parent = own / self.cgroup_name
            if parent.is_dir():
                found += [child for child in parent.iterdir() if child.is_dir()]
        return found

    def _claimed_slots(self) -> set[int]:
        slots_dir = self.service.run_dir / "sandboxes" / ".netslots"
        claimed = {int(marker.name) for marker in slots_dir.glob("*") if marker.name.isdigit()}
        self.slots_seen |= claimed
        return claimed

    def _netns(self) -> set[int]:
        """Slots seen for this service whose namespace exists."""
        self._claimed_slots()
        names = {entry.name for entry in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()
        return {slot for slot in self.slots_seen if f"{NETNS_PREFIX}{slot}" in names}

    @staticmethod
    def _taps(slots: set[int]) -> int:
        taps = 0
        for slot in slots:
            shown = subprocess.run(["ip", "-n", f"{NETNS_PREFIX}{slot}", "-o", "link", "show", "type", "tun"],
                                   capture_output=True, text=True)
            taps += len([line for line in shown.stdout.splitlines() if line.strip()])
        return taps

    def _veths(self) -> int:
        names = {entry.name for entry in Path("/sys/class/net").iterdir()}
        return len([slot for slot in self.slots_seen if f"{HOST_VETH_PREFIX}{slot}h" in names])

    def _service_processes(self) -> dict[str, int]:
        """name -> PID of the master, each worker and the keeper (found as the master's children)."""
        service = self.service
        if service.process is None or service.process.poll() is not None:
            return {}
        found = {"master": service.master_pid}
        for n, pid in enumerate(sorted(service.worker_pids())):
            found[f"worker-{n}"] = pid
        for pid in service.keeper_pids():
            found["keeper"] = pid
        return found

    # ---- the count -------------------------------------------------------------------------------------------

    def take(self) -> Snapshot:
        run_dir, state_dir = self.service.run_dir, self.service.state_dir
        rows = self._registry()
        ids = {sandbox_id for sandbox_id, _state, _dir in rows}
        vms = run_dir / "sandboxes"
        vm_dirs = [entry for entry in vms.glob("vm-*") if entry.is_dir()] if vms.is_dir() else []
        files = [path for path in run_dir.rglob("*") if not path.is_dir()] if run_dir.is_dir() else []
        processes = self._service_processes()
        netns = self._netns()
        orphans = [f"VM dir {entry.name} (no registry row)" for entry in vm_dirs if not _owned(entry.name, ids)]
        live_pids = {self._pid_of(entry) for entry in vm_dirs} | self._template_pids()
        orphans += [f"QEMU {pid} (no VM dir holds its pid)" for pid in qemu_processes(run_dir)
                    if pid not in live_pids]
        present = {entry.name for entry in vm_dirs} | {entry.name for entry in (run_dir / "templates").glob("*/*")
                                                       if entry.is_dir()}
        cgroups = self.cgroup_dirs()
        orphans += [f"cgroup {cgroup} (no VM dir)" for cgroup in cgroups if cgroup.name not in present]
        claimed = self._claimed_slots()
        orphans += [f"netns {NETNS_PREFIX}{slot} (no claim)" for slot in netns - claimed]
        snapshots_dir = state_dir / "snapshots"
        frozen = {sandbox_id for sandbox_id, state, _dir in rows if state == "frozen"}
        snapshots = [entry.name for entry in snapshots_dir.iterdir() if entry.is_dir()] if snapshots_dir.is_dir() \
            else []
        orphans += [f"snapshot {name} (not frozen)" for name in snapshots if name not in frozen]
        registry_files = [state_dir / f"registry.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")]
        counts: dict[str, int] = {}
        for _id, state, _dir in rows:
            counts[state] = counts.get(state, 0) + 1
        return Snapshot(
            qemus=len(qemu_processes(run_dir)),
            vm_dirs=len(vm_dirs),
            sockets=len([path for path in files if path.is_socket()]),
            run_files=len(files),
            run_kib=_allocated_kib(files),
            cgroups=len(cgroups),
            netns=len(netns),
            taps=self._taps(netns),
            veths=self._veths(),
            snapshots=len(snapshots),
            registry_rows=counts,
            registry_bytes=sum(path.stat().st_size for path in registry_files if path.exists()),
            fds={name: _fd_count(pid) for name, pid in processes.items()},
            rss_kib={name: rss_kib(pid) for name, pid in processes.items()},
            orphans=orphans,
        )

    @staticmethod
    def _pid_of(vm_dir: Path) -> int | None:
        try:
            return int((vm_dir / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None

    def _template_pids(self) -> set[int]:
        pids: set[int] = set()
        templates = self.service.run_dir / "templates"
        for pidfile in templates.rglob("qemu.pid") if templates.is_dir() else []:
            try:
                pids.add(int(pidfile.read_text()))
            except (OSError, ValueError):
                continue
        return pids


def qemu_processes(run_dir: Path) -> list[int]:
    """QEMU itself (not the bwrap or sh that started it, whose command lines name QEMU too) under `run_dir`."""
    found = []
    for pid in qemu_pids_under(run_dir):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                found.append(pid)
        except OSError:
            continue
    return found


def service_pids(service: LiveService) -> list[int]:
    """The master and every process below it (workers, keeper, their children): what a reboot ends."""
    if service.process is None:
        return []
    found, todo = [], [service.master_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children_of(pid)
    return found


def _owned(vm_dir_name: str, ids: set[str]) -> bool:
    """A VM dir is vm-<sandbox id> (create, clone, fork) or vm-<sandbox id>-<4 hex> (a resume's fresh one)."""
    name = vm_dir_name.removeprefix("vm-")
    return name in ids or name.rsplit("-", 1)[0] in ids


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _allocated_kib(files: list[Path]) -> int:
    total = 0
    for path in files:
        try:
            total += path.lstat().st_blocks // 2
        except OSError:
            continue
    return total
