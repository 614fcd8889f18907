"""The VMM jail, checked from the host's /proc: who QEMU runs as, what it may do, what it sees, where it is."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp.qmp_client import ExecInterruptedError, ExecuteError

from service.engine.jail import limits_for
from service.engine.launch import DirectLauncher
from service.engine.vm import VirtualMachine
from tests.vmtools import qemu_pids_under

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def jailed(jailed_engine):
    with jailed_engine.boot(memory_mib=512) as sandbox:
        yield sandbox


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_qemu_is_unprivileged_with_no_capabilities_and_seccomp(jailed, jailed_engine):
    fields = status(jailed.vm.pid)
    uids = set(fields["Uid"].split())
    assert uids == {str(jailed_engine.launcher.jail.identity.uid)} and "0" not in uids
    assert "0" not in fields["Gid"].split()
    assert fields["Groups"].split() == [str(jailed_engine.launcher.jail.identity.gid)]  # no root or other groups kept
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[caps], 16) == 0, caps
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # filter mode: QEMU's -sandbox is installed
    assert Path(f"/proc/{jailed.vm.pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"qemu-system-x86_64")


def test_qemu_is_pid_1_of_its_own_namespaces(jailed):
    pid = jailed.vm.pid
    assert status(pid)["NSpid"].split() == [str(pid), "1"]
    for namespace in ("pid", "net", "ipc", "uts", "mnt"):
        assert os.readlink(f"/proc/{pid}/ns/{namespace}") != os.readlink(f"/proc/self/ns/{namespace}"), namespace


def test_mount_view_holds_only_the_vms_own_files(jailed, run_root):
    pid, vm = jailed.vm.pid, jailed.vm
    root = Path(f"/proc/{pid}/root")
    # Host secrets and other VMs are not there at all (not merely unreadable).
    secret_sibling = vm.dir.parent / "not-for-this-vm"
    secret_sibling.write_text("x")
    try:
        for path in ("/etc/shadow", "/etc/passwd", "/home", "/var", "/tmp", str(secret_sibling), "/root/.bashrc"):
            assert not (root / path.lstrip("/")).exists(), path
    finally:
        secret_sibling.unlink()
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["ld.so.cache"]
    assert (root / str(vm.dir).lstrip("/") / "qmp.sock").exists()
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = set(fields[5].split(","))
    allowed = {"/", "/usr", "/etc/ld.so.cache", "/proc", str(vm.dir),
               str(vm.config.kernel), str(vm.config.initrd), str(vm.config.rootfs)}
    unexpected = {m for m in mounts if m not in allowed and not m.startswith(("/dev", "/proc/"))}
    assert unexpected == set()
    for image_file in (vm.config.kernel, vm.config.initrd, vm.config.rootfs, Path("/usr")):
        assert "ro" in mounts[str(image_file)], image_file
    assert "rw" in mounts[str(vm.dir)]


def test_cgroup_membership_and_limits(jailed, jailed_engine):
    jail, vm = jailed_engine.launcher.jail, jailed.vm
    if jail.layout.version == 0:
        pytest.skip("no cgroup controllers on this host")
    limits = limits_for(vm.config, jail.policy)
    membership = Path(f"/proc/{vm.pid}/cgroup").read_text()
    created = [Path(line) for line in (vm.dir / "cgroups").read_text().split()]
    assert created and all(d.name == vm.dir.name and d.parent.name == jail.policy.cgroup_name for d in created)
    for directory in created:
        assert str(vm.pid) in (directory / "cgroup.procs").read_text().split()
    if jail.layout.version == 1:
        by_controller = {d.relative_to("/sys/fs/cgroup").parts[0]: d for d in created}
        assert f"/{jail.policy.cgroup_name}/{vm.dir.name}" in membership
        assert int((by_controller["memory"] / "memory.limit_in_bytes").read_text()) == limits.memory_bytes
        assert int((by_controller["cpu"] / "cpu.cfs_quota_us").read_text()) == limits.cpu_quota_us
        assert int((by_controller["pids"] / "pids.max").read_text()) == limits.pids_max
    else:
        (directory,) = created
        assert (directory / "memory.max").read_text().strip() == str(limits.memory_bytes)
        assert (directory / "cpu.max").read_text().split() == [str(limits.cpu_quota_us), str(limits.cpu_period_us)]


def test_sockets_reach_the_vm_group_but_not_others(jailed, jailed_engine, run_root):
    """A service running as another user (a DynamicUser with the VM group) can connect; anyone else cannot."""
    sock = str(jailed.vm.paths.qmp_socket)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('ok')\nexcept PermissionError: print('denied')")
    gid = jailed_engine.launcher.jail.identity.gid

    def connect_as(groups: str) -> str:
        argv = ["setpriv", "--reuid=65534", f"--regid={65534}", f"--groups={groups}", "--",
                "/usr/bin/python3", "-c", probe, sock]
        return subprocess.run(argv, capture_output=True, text=True, check=True, cwd="/").stdout.strip()

    info = os.stat(sock)
    assert info.st_gid == gid and info.st_mode & 0o777 == 0o770
    # The session's temp dirs are root-only: open the way down to the VM dir for this probe, then close it again.
    ancestors = [p for p in jailed.vm.dir.parents if p.is_relative_to(run_root)]
    modes = {p: p.stat().st_mode & 0o7777 for p in ancestors}
    try:
        for path in ancestors:
            path.chmod(modes[path] | 0o001)
        assert connect_as(str(gid)) == "ok"
        assert connect_as("65534") == "denied"
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    # the host side (root here) still connects as before
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(sock)


@dataclass(frozen=True)
class SpawnAttempt:
    seccomp: str  # /proc/<pid>/status "Seccomp" of the live QEMU before the attempt: "2" = filter installed
    exit_status: int | None  # None: QEMU lives on; else what vm.exited() says (for a jailed QEMU, bwrap's status)
    helper_ran: bool  # the helper program's file appeared in the VM's own directory
    refusal: str = ""  # the monitor's error when QEMU lived on and said why it did not spawn


def try_to_spawn(vm: VirtualMachine) -> SpawnAttempt:
    """Ask a live QEMU to run a helper program: an `exec:` migration whose command creates a file in the VM's
    directory (bound read-write into the jail and writable by the VM user, so only the filter can stop it)."""
    marker = vm.dir / "spawned-by-qemu"
    seccomp = status(vm.pid)["Seccomp"]
    qmp = vm.qmp()
    qmp.cmd("stop")
    try:
        qmp.cmd("migrate", uri=f"exec:touch {marker}")
    except ExecInterruptedError:  # the monitor connection drops if QEMU dies in the command
        pass
    except ExecuteError as exc:  # QEMU ≥ 8 lives on: the filter answers the fork with EPERM
        return SpawnAttempt(seccomp, vm.exited(), marker.exists(), refusal=str(exc))
    deadline = time.monotonic() + 60  # a hang deadline: either outcome comes within milliseconds
    while vm.exited() is None and not marker.exists():
        assert time.monotonic() < deadline, "QEMU neither died nor ran the helper"
        time.sleep(0.01)
    return SpawnAttempt(seccomp, vm.exited(), marker.exists())


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in entries if entry)


@pytest.mark.parametrize("launcher", ["jailed", "direct"])
def test_no_process_the_engine_starts_inherits_the_services_secrets(jailed_engine, run_dir, monkeypatch, launcher):
    """QEMU (and the jail's tools) start with an environment of their own: a VMM escape finds no API key."""
    monkeypatch.setenv("APPLIANCE_API_KEYS", "a-tenant-key")
    monkeypatch.setenv("APPLIANCE_SERVICE__WARM_CODE", "print('spec in the environment')")
    start = jailed_engine.launcher.start if launcher == "jailed" else DirectLauncher().start
    vm = start(jailed_engine.machine(memory_mib=256), run_dir, die_with_parent=True)
    try:
        pids = {vm.pid, vm.process.pid} if vm.process is not None else {vm.pid}  # QEMU, and bwrap above it
        for pid in pids:
            env = environment(pid)
            assert "PATH" in env and not [name for name in env if name.startswith("APPLIANCE_")], (pid, env)
            assert "a-tenant-key" not in "".join(env.values())
    finally:
        vm.stop()


def test_seccomp_stops_a_jailed_qemu_that_tries_to_spawn(jailed_engine, run_dir):
    """spawn=deny: the filter stops QEMU at the fork, before the helper runs. QEMU 7.2's filter killed it with
    SIGSYS; QEMU 10's fails the fork with EPERM and QEMU lives on."""
    vm = jailed_engine.launcher.start(jailed_engine.machine(memory_mib=256), run_dir, die_with_parent=True)
    try:
        assert vm.process is not None and vm.process.pid != vm.pid  # our child is the jail (bwrap), QEMU its child
        # bwrap reports its child's death by signal n as exit status 128 + n (as a shell does)
        attempt = try_to_spawn(vm)
        assert attempt.seccomp == "2" and not attempt.helper_ran, attempt
        assert attempt.exit_status == 128 + signal.SIGSYS or (
            attempt.exit_status is None and "Operation not permitted" in attempt.refusal
        ), attempt
    finally:
        vm.stop()


def test_the_spawn_check_reports_an_unfiltered_qemu(jailed_engine, run_dir):
    """Negative control for the test above: the same QEMU without the jail (so without -sandbox) runs the
    helper and lives on, so that test would see a filter that lets QEMU spawn."""
    vm = DirectLauncher().start(jailed_engine.machine(memory_mib=256), run_dir, die_with_parent=True)
    try:
        assert try_to_spawn(vm) == SpawnAttempt("0", None, helper_ran=True)
    finally:
        vm.stop()


def test_close_removes_process_cgroups_and_files(jailed_engine):
    sandbox = jailed_engine.boot(memory_mib=256)
    vm_dir, pid = sandbox.vm.dir, sandbox.vm.pid
    created = [Path(line) for line in (vm_dir / "cgroups").read_text().split()]
    sandbox.close()
    assert not vm_dir.exists()
    assert qemu_pids_under(vm_dir) == []
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    assert not any(d.exists() for d in created)
