"""The jail around each QEMU process: an unprivileged user, no capabilities, QEMU's seccomp sandbox, a mount view
holding only the VM's own files, private pid/net/ipc/uts namespaces, and a cgroup sized from the VM.

Tools: bubblewrap builds the namespaces and the mount view (declarative argv, no code of ours runs between fork
and exec), util-linux `setpriv` drops to the VM user with an empty capability set and no_new_privs, and a
two-line `sh` puts the process into its cgroup before anything else runs. The pure part (argv, limits, cgroup
file values, cgroup layout from /proc) is separate from the I/O (user, directories, cgroups) below it.
See docs/security.md for the threat model and why each piece is there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import dirfd
from .machine import MachineConfig

log = logging.getLogger(__name__)

CGROUP_FILE = "cgroups"  # in the VM dir, written by the host: the cgroup directories to remove at stop
_CPU_PERIOD_US = 100_000
_CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("cpu", "memory", "pids")
TEMPLATE_MEMORY_MODE = 0o660  # a template's RAM file: the VM user's (QEMU maps it), rw for the engine via the group
# What QEMU needs from the host's root: its binary, libraries and firmware (all under /usr on merged-/usr Debian).
_SYSTEM_RO = ("/usr", "/etc/ld.so.cache")
_MERGED_USR_LINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))


BWRAP, SETPRIV = "bwrap", "setpriv"


class JailError(OSError):
    pass


@dataclass(frozen=True)
class JailPolicy:
    """The operator's choices (spec section [isolation])."""

    user: str
    memory_overhead_mib: int  # QEMU itself + the TCG translation cache on top of the guest's RAM
    cpu_overhead: float  # CPUs for QEMU's own threads (I/O, RCU) on top of one per vCPU
    pids_max: int  # threads of one QEMU (vCPUs, I/O thread pool of up to 64, RCU, main loop)
    cgroup_name: str  # parent cgroup below the service's own cgroup


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups (e.g. the group of /dev/kvm)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids_max: int


def limits_for(machine: MachineConfig, policy: JailPolicy) -> Limits:
    """A VM's cgroup limits: its RAM plus QEMU's overhead; its vCPUs plus a share for QEMU's own threads."""
    return Limits(
        memory_bytes=(machine.memory_mib + policy.memory_overhead_mib) << 20,
        cpu_quota_us=int((machine.vcpus + policy.cpu_overhead) * _CPU_PERIOD_US),
        cpu_period_us=_CPU_PERIOD_US,
        pids_max=policy.pids_max,
    )


def cgroup_settings(version: int, limits: Limits) -> dict[str, dict[str, str]]:
    """File values per controller (v1) or for the one unified directory (v2, key "")."""
    if version == 2:
        return {"": {
            "memory.max": str(limits.memory_bytes),
            "memory.swap.max": "0",
            "cpu.max": f"{limits.cpu_quota_us} {limits.cpu_period_us}",
            "pids.max": str(limits.pids_max),
        }}
    return {
        "cpu": {"cpu.cfs_period_us": str(limits.cpu_period_us), "cpu.cfs_quota_us": str(limits.cpu_quota_us)},
        "memory": {"memory.limit_in_bytes": str(limits.memory_bytes)},
        "pids": {"pids.max": str(limits.pids_max)},
    }


@dataclass(frozen=True)
class CgroupLayout:
    """Where this process's own cgroup is, per controller (v1) or once (v2, key ""); VMs go below it."""

    version: int  # 1, 2, or 0 when no usable cgroup filesystem was found
    own: dict[str, Path] = field(default_factory=dict)


def cgroup_layout(mountinfo: str, self_cgroup: str) -> CgroupLayout:
    """From /proc/self/mountinfo and /proc/self/cgroup. A pure v2 host mounts cgroup2 at /sys/fs/cgroup; a v1 (or
    hybrid) host has one cgroup mount per controller; a hybrid's cgroup2 mount carries no controllers we can use."""
    mounts: list[tuple[Path, str, set[str]]] = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if len(parts) < 5 or len(rparts) < 3:
            continue
        mounts.append((Path(parts[4]), rparts[0], set(rparts[2].split(","))))
    paths: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            paths[""] = path
        for controller in filter(None, controllers.split(",")):
            paths[controller] = path
    for mountpoint, fstype, _ in mounts:
        if fstype == "cgroup2" and mountpoint == _CGROUP_ROOT and "" in paths:
            return CgroupLayout(2, {"": mountpoint / paths[""].lstrip("/")})
    own: dict[str, Path] = {}
    for controller in _V1_CONTROLLERS:
        for mountpoint, fstype, options in mounts:
            if fstype == "cgroup" and controller in options and controller in paths:
                own[controller] = mountpoint / paths[controller].lstrip("/")
                break
    return CgroupLayout(1 if own else 0, own)


def bind_ancestors(paths: list[Path]) -> list[Path]:
    """Directories bwrap must create (traversable) above each bind target, parents first, without duplicates."""
    seen: list[Path] = []
    for path in paths:
        for ancestor in reversed(path.parents):
            if ancestor != Path("/") and ancestor not in seen and ancestor not in paths:
                seen.append(ancestor)
    return seen


def jail_argv(
    qemu_argv: list[str],
    machine: MachineConfig,
    vm_dir: Path,
    identity: Identity,
    policy: JailPolicy,
    info_fd: int,
    cgroup_procs: list[Path],
    die_with_parent: bool = False,
    detach: bool = False,
    fds: dict[Path, int] | None = None,
) -> list[str]:
    """The full argv: [setsid -f] sh (join cgroup) -> bwrap (namespaces, mount view) -> setpriv (drop) -> QEMU.

    `fds` holds a descriptor the host opened for each bound path it has one for: bwrap binds what that descriptor
    holds (--ro-bind-fd/--bind-fd; bwrap closes it before QEMU runs), never what the path names by then."""
    fds = fds or {}
    ro = [machine.kernel, machine.initrd, machine.rootfs]
    rw = [vm_dir]
    if machine.memory_file is not None:  # a copy's RAM file is bound read-only: no copy can change it
        (rw if machine.memory_shared else ro).append(machine.memory_file)
    argv: list[str] = ["setsid", "--fork"] if detach else []
    # Join the cgroups by writing our own PID, then exec: everything after (bwrap, QEMU) starts inside them.
    script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
    argv += ["sh", "-c", script, "appliance-jail", str(len(cgroup_procs)), *map(str, cgroup_procs)]
    argv += [
        BWRAP,
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--as-pid-1",  # QEMU itself is PID 1 of its namespace: it sees no other process, and none sees it
        "--new-session",
        "--dev", "/dev", "--proc", "/proc",
    ]
    if die_with_parent:
        argv.append("--die-with-parent")
    for path in _SYSTEM_RO:
        argv += ["--ro-bind", path, path]
    for target, link in _MERGED_USR_LINKS:
        argv += ["--symlink", target, link]
    for ancestor in bind_ancestors(ro + rw):
        argv += ["--perms", "0755", "--dir", str(ancestor)]
    for path in ro:
        argv += ["--ro-bind-fd", str(fds[path]), str(path)] if path in fds else ["--ro-bind", str(path), str(path)]
    for path in rw:
        argv += ["--bind-fd", str(fds[path]), str(path)] if path in fds else ["--bind", str(path), str(path)]
    if machine.accelerator == "kvm":
        argv += ["--dev-bind", "/dev/kvm", "/dev/kvm"]
    argv += ["--chdir", "/", "--info-fd", str(info_fd), "--"]
    groups = ",".join(str(g) for g in (identity.gid, *identity.groups))
    argv += [
        SETPRIV,
        f"--reuid={identity.uid}", f"--regid={identity.gid}", f"--groups={groups}",
        "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]
    return argv + qemu_argv


# ---- I/O ----------------------------------------------------------------------------------------------------

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Loud, but once per process: an unenforceable limit is a property of the host, not of each VM."""
    if key not in _warned:
        _warned.add(key)
        log.warning("ISOLATION NOT ENFORCED: %s", message)


# How to give the jailed VM user /dev/kvm: its own group (the jail adds the device's group to the VM user, never
# root's), read-write for that group, and a udev rule so it survives reboots.
KVM_DEVICE = Path("/dev/kvm")
KVM_GROUP_FIX = ('groupadd -r kvm; chgrp kvm /dev/kvm; chmod 660 /dev/kvm (across reboots: a udev rule '
                 'KERNEL=="kvm", GROUP="kvm", MODE="0660")')


def kvm_jail_problem(mode: int, gid: int) -> str | None:
    """Why the jailed VM user cannot open a /dev/kvm with this mode and group, or None. Pure.

    The jail is still in force either way: what is lost is KVM, so the VMs fall back to TCG (accelerator auto)."""
    if mode & 0o006 == 0o006 or (gid != 0 and mode & 0o060 == 0o060):
        return None
    group = "group root" if gid == 0 else f"group {gid} without read-write for the group"
    return (f"/dev/kvm is {mode & 0o777:04o} with {group}: the jailed VM user cannot open it, so jailed VMs "
            "cannot use KVM (they fall back to TCG, 10-30x slower)")


def kvm_device_jail_problem(device: Path = KVM_DEVICE) -> str | None:
    """kvm_jail_problem for the real device; None if there is no device (then KVM is out for everyone)."""
    try:
        info = os.stat(device)
    except OSError:
        return None
    return kvm_jail_problem(info.st_mode, info.st_gid)


def jail_unavailable() -> str | None:
    """Why this process cannot jail VMs, or None if it can."""
    if os.geteuid() != 0:
        return "the service does not run as root (needed to switch to the VM user and create cgroups)"
    for tool, package in ((BWRAP, "bubblewrap"), (SETPRIV, "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install {package})"
    return None


def ensure_user(name: str) -> tuple[int, int]:
    """The VM user's uid and gid; created (a system user with its own group, no home, no shell) if missing."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise JailError(f"the VM user {name!r} does not exist and only root can create it")
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", "appliance sandbox VMM", name],
        check=True, capture_output=True,
    )
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


class Jail:
    """One per engine: the resolved VM identity and cgroup layout, and the per-VM setup and teardown."""

    def __init__(self, policy: JailPolicy, layout: CgroupLayout | None = None, memory_root: Path | None = None) -> None:
        why = jail_unavailable()
        if why is not None:
            raise JailError(f"cannot jail sandbox VMs: {why}")
        self.policy = policy
        self.memory_root = memory_root  # memory files are opened below it (the launcher: its clients' run root)
        uid, gid = ensure_user(policy.user)
        groups: tuple[int, ...] = ()
        with contextlib.suppress(OSError):
            kvm_gid = os.stat(KVM_DEVICE).st_gid
            if kvm_gid != 0:
                groups = (kvm_gid,)
        self.identity = Identity(uid, gid, groups)
        self.kvm_problem = kvm_device_jail_problem()
        if layout is None:
            layout = cgroup_layout(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
        self.layout = layout
        if layout.version == 0:
            warn_once("cgroup", "no cgroup filesystem with cpu/memory/pids controllers: VMs run without limits")
        for controller in _V1_CONTROLLERS:
            if layout.version == 1 and controller not in layout.own:
                warn_once(f"cgroup-{controller}", f"cgroup v1 controller {controller!r} is not mounted: no limit")

    def prepare(self, machine: MachineConfig, vm_dir: Path, vm_fd: int) -> tuple[list[Path], dict[Path, int]]:
        """Open what the VM is given and create its cgroups; returns the cgroup.procs files the launcher joins and
        a descriptor per path bwrap binds (the caller closes them). The VM dir (`vm_fd`, made root-owned, group VM
        user, setgid + sticky by the caller) lets QEMU create its sockets and logs but not replace what the host
        wrote. Images: only files that are root's alone, in directories that are root's alone (dirfd.py), so what
        is opened here is what QEMU sees. The memory file: opened below the memory root without following links."""
        if machine.accelerator == "kvm" and self.kvm_problem is not None and "kvm" not in _warned:
            _warned.add("kvm")  # not warn_once: isolation is in force, only KVM is lost
            log.warning("KVM NOT USABLE BY THE JAILED VM USER: %s; fix: %s", self.kvm_problem, KVM_GROUP_FIX)
        fds: dict[Path, int] = {vm_dir: os.dup(vm_fd)}
        try:
            for image in (machine.kernel, machine.initrd, machine.rootfs):
                fds[image] = dirfd.open_root_owned(image)
            if machine.memory_file is not None:
                fds[machine.memory_file] = self._open_memory_file(machine.memory_file, machine.memory_shared)
            return self._create_cgroups(machine, vm_dir, vm_fd), fds
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise

    def _open_memory_file(self, path: Path, shared: bool) -> int:
        """A descriptor of the RAM file to bind; bwrap binds existing files only.

        shared (a template's VM writes its RAM there): made here for the VM user, who QEMU maps it as; an existing
        one must be a file made for the VM user. Not shared (a copy maps a template's or a fork's file read-only):
        the file the template VM or the engine wrote, made readable to the VM group and writable by no VM. Either
        way a regular file with one link (not a hard link to someone else's file), reached without links."""
        root = self.memory_root or path.parent
        if shared:
            try:
                fd = dirfd.open_beneath(root, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.fchown(fd, self.identity.uid, self.identity.gid)
                    # group rw: the engine (in the VM group, not root) reads the finished template's extents and
                    # punches zero pages out of it again (template.py); no VM reaches it but through its binds
                    os.fchmod(fd, TEMPLATE_MEMORY_MODE)
                finally:
                    os.close(fd)
            except FileExistsError:
                pass
            fd = dirfd.open_beneath(root, path, os.O_PATH)
        else:
            fd = dirfd.open_beneath(root, path, os.O_RDONLY)
        info = os.fstat(fd)
        # A fork's file is the engine's (this process, or under the launcher the API user: not root); a
        # template's is the VM user's.
        owners_ok = info.st_uid in (self.identity.uid, os.geteuid()) or (not shared and info.st_uid != 0)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not owners_ok:
            os.close(fd)
            raise JailError(f"memory file {path} is not one made for the VM user or by the engine")
        if not shared:
            try:
                os.fchown(fd, -1, self.identity.gid)
                # the engine's own fork file: the VM group reads it; the VM user's template: the engine keeps rw
                os.fchmod(fd, TEMPLATE_MEMORY_MODE if info.st_uid == self.identity.uid else 0o640)
            except OSError:
                os.close(fd)
                raise
        return fd

    def _create_cgroups(self, machine: MachineConfig, vm_dir: Path, vm_fd: int) -> list[Path]:
        settings = cgroup_settings(self.layout.version, limits_for(machine, self.policy))
        created: list[Path] = []
        try:
            for controller, files in settings.items():
                own = self.layout.own.get(controller)
                if own is None:
                    continue
                parent = own / self.policy.cgroup_name
                if self.layout.version == 2:
                    self._enable_v2_controllers(own, parent)
                directory = parent / vm_dir.name
                directory.mkdir(parents=True, exist_ok=True)
                sweep_stale_cgroups(parent)
                created.append(directory)
                for name, value in files.items():
                    try:
                        (directory / name).write_text(value)
                    except OSError as exc:
                        warn_once(f"{controller}:{name}", f"cannot set {name}={value} in {directory}: {exc.strerror}")
        except OSError as exc:
            warn_once("cgroup-create", f"cannot create the VM's cgroup ({exc}): VMs run without limits")
            remove_cgroups(created)
            return []
        dirfd.write_new(vm_fd, CGROUP_FILE, "".join(f"{d}\n" for d in created))
        return [d / "cgroup.procs" for d in created]

    def _enable_v2_controllers(self, own: Path, parent: Path) -> None:
        for directory in (own, parent):
            if directory == parent:
                parent.mkdir(exist_ok=True)
            try:
                (directory / "cgroup.subtree_control").write_text("+cpu +memory +pids")
            except OSError as exc:
                warn_once("cgroup-v2-delegate", f"cannot enable cpu/memory/pids below {directory}: {exc.strerror} "
                          "(on systemd: run the service with Delegate=yes, its processes in a leaf cgroup)")
                return


def remove_cgroups(directories: list[Path]) -> None:
    """rmdir each (a cgroup empties a moment after its last process is reaped); then their parent if empty."""
    for directory in directories:
        if not str(directory).startswith(f"{_CGROUP_ROOT}/"):
            continue  # the list comes from a file in the VM dir: never rmdir anything else
        deadline = time.monotonic() + 10  # a big QEMU can take seconds to release its memory under load
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("cgroup %s is still busy; left behind", directory)
                    break
                time.sleep(0.01)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # only succeeds when no other VM's cgroup is left in it


def sweep_stale_cgroups(parent: Path, min_age_s: float = 120.0) -> None:
    """Remove VM cgroups left empty by VMs whose stop() never ran (killed from outside, dir wiped, slow exit).
    Only old ones: a new cgroup is empty for the moment between its creation and its launcher joining it."""
    now = time.time()
    with contextlib.suppress(OSError):
        for child in parent.iterdir():
            if not child.is_dir() or not child.name.startswith("vm-"):
                continue
            with contextlib.suppress(OSError):
                if now - child.stat().st_mtime > min_age_s and not (child / "cgroup.procs").read_text().strip():
                    child.rmdir()


def oom_report(vm_dir: Path) -> str | None:
    """What the host did, if its OOM killer ended this VM's QEMU for reaching the VM's memory cgroup limit; read it
    before the VM's cgroups are removed (v1: memory.oom_control, v2: memory.events; both count `oom_kill`)."""
    try:
        directories = [Path(line) for line in (vm_dir / CGROUP_FILE).read_text().split()]
    except OSError:
        return None
    for directory in directories:
        for counters, limit_file in (("memory.events", "memory.max"), ("memory.oom_control", "memory.limit_in_bytes")):
            try:
                fields = dict(line.split(maxsplit=1) for line in (directory / counters).read_text().splitlines())
                kills = int(fields.get("oom_kill", "0"))
                limit = (directory / limit_file).read_text().strip()
            except (OSError, ValueError):
                continue
            if kills > 0:
                size = f"{int(limit) >> 20} MiB" if limit.isdigit() else limit
                return (f"the host's OOM killer ended QEMU: the VM reached its host memory limit ({size}: guest "
                        "memory + isolation.memory_overhead_mib)")
    return None


def remove_vm_cgroups(vm_dir: Path) -> None:
    """The VM's cgroups, as recorded at start (any process can stop a VM: it only needs its directory)."""
    try:
        lines = (vm_dir / CGROUP_FILE).read_text().split()
    except OSError:
        return
    remove_cgroups([Path(line) for line in lines])

