"""The VMM jail's pure logic: launcher argv, limits, cgroup files and layout. No VM, no root needed."""

from __future__ import annotations

from pathlib import Path

from service.engine.jail import (
    CgroupLayout,
    Identity,
    bind_ancestors,
    cgroup_layout,
    cgroup_settings,
    jail_argv,
    limits_for,
)
from service.engine.machine import SECCOMP_OPTION, MachineConfig, RuntimePaths, build_qemu_command
from tests.configs import jail_policy

IMG = Path("/var/lib/appliance/images/g1")
MACHINE = MachineConfig(kernel=IMG / "vmlinuz", initrd=IMG / "initrd.img", rootfs=IMG / "rootfs.ext4",
                        accelerator="tcg", vcpus=2, memory_mib=1024,
                        memory_file=Path("/dev/shm/appliance/templates/tpl-1/memory"), memory_shared=False)
VM_DIR = Path("/dev/shm/appliance/sandboxes/vm-sb-1")
ID = Identity(999, 995)


def argv(**kw) -> list[str]:
    qemu = build_qemu_command(MACHINE, RuntimePaths(VM_DIR, seccomp=True))
    return jail_argv(qemu, MACHINE, VM_DIR, ID, jail_policy(), 7, [Path("/sys/fs/cgroup/memory/x/cgroup.procs")], **kw)


def pairs(args: list[str], flag: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == flag]


def test_seccomp_option_denies_every_group():
    argv = build_qemu_command(MACHINE, RuntimePaths(VM_DIR, seccomp=True))
    assert argv[argv.index("-sandbox") + 1] == SECCOMP_OPTION
    for group in ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"):
        assert f"{group}=deny" in SECCOMP_OPTION
    assert "-sandbox" not in build_qemu_command(MACHINE, RuntimePaths(VM_DIR))


def test_launcher_order_cgroup_then_bwrap_then_setpriv_then_qemu():
    args = argv()
    assert args[0] == "sh" and "/sys/fs/cgroup/memory/x/cgroup.procs" in args
    bwrap, setpriv, qemu = args.index("bwrap"), args.index("setpriv"), args.index("qemu-system-x86_64")
    assert bwrap < setpriv < qemu
    assert args[setpriv - 1] == "--"
    drop = args[setpriv:qemu]
    assert {"--reuid=999", "--regid=995", "--groups=995", "--no-new-privs", "--bounding-set=-all",
            "--inh-caps=-all", "--ambient-caps=-all"} <= set(drop)


def test_namespaces_and_pid1():
    args = argv()
    for flag in ("--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--as-pid-1", "--new-session"):
        assert flag in args
    assert args[args.index("--info-fd") + 1] == "7"


def test_mount_view_is_only_the_vms_files():
    args = argv()
    ro = dict(pairs(args, "--ro-bind"))
    rw = dict(pairs(args, "--bind"))
    # A clone's RAM file (MACHINE is one) is read-only: no clone can write what the others map.
    assert set(ro) == {"/usr", "/etc/ld.so.cache", str(MACHINE.kernel), str(MACHINE.initrd), str(MACHINE.rootfs),
                       str(MACHINE.memory_file)}
    assert set(rw) == {str(VM_DIR)}
    assert all(src == dst for src, dst in [*ro.items(), *rw.items()])  # same paths inside: same QEMU argv
    assert "--dev-bind" not in args  # no /dev/kvm under TCG


def test_kvm_device_only_for_kvm():
    from dataclasses import replace
    machine = replace(MACHINE, accelerator="kvm")
    args = jail_argv([], machine, VM_DIR, ID, jail_policy(), 3, [])
    assert ("/dev/kvm", "/dev/kvm") in pairs(args, "--dev-bind")


def test_detach_forks_off_and_die_with_parent_is_passed():
    assert argv(detach=True)[:2] == ["setsid", "--fork"]
    assert argv()[0] == "sh"
    assert "--die-with-parent" in argv(die_with_parent=True)
    assert "--die-with-parent" not in argv()


def test_bind_ancestors_are_parents_first_and_unique():
    got = bind_ancestors([Path("/a/b/c"), Path("/a/b/d"), Path("/a/x")])
    assert got == [Path("/a"), Path("/a/b")]


def test_limits_follow_the_machine():
    limits = limits_for(MACHINE, jail_policy(memory_overhead_mib=256, cpu_overhead=0.5, pids_max=99))
    assert limits.memory_bytes == (1024 + 256) << 20
    assert limits.cpu_quota_us == 250_000 and limits.cpu_period_us == 100_000
    assert limits.pids_max == 99


def test_cgroup_files_v1_and_v2():
    limits = limits_for(MACHINE, jail_policy())
    v1 = cgroup_settings(1, limits)
    assert v1["memory"]["memory.limit_in_bytes"] == str(limits.memory_bytes)
    assert v1["cpu"]["cpu.cfs_quota_us"] == str(limits.cpu_quota_us)
    assert v1["pids"]["pids.max"] == "256"
    v2 = cgroup_settings(2, limits)[""]
    assert v2["memory.max"] == str(limits.memory_bytes)
    assert v2["cpu.max"] == f"{limits.cpu_quota_us} 100000"
    assert v2["memory.swap.max"] == "0"


V1_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_SELF = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"


def test_layout_v1_nests_below_our_own_cgroup_per_controller():
    layout = cgroup_layout(V1_MOUNTINFO, V1_SELF)
    assert layout.version == 1
    assert layout.own == {
        "cpu": Path("/sys/fs/cgroup/cpu"),
        "memory": Path("/sys/fs/cgroup/memory/process_api/abc"),
        "pids": Path("/sys/fs/cgroup/pids"),
    }


def test_layout_v2_unified():
    mountinfo = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    layout = cgroup_layout(mountinfo, "0::/system.slice/appliance-api.service\n")
    assert layout == CgroupLayout(2, {"": Path("/sys/fs/cgroup/system.slice/appliance-api.service")})


def test_layout_without_controllers_is_version_0():
    assert cgroup_layout("30 25 0:26 / /proc rw - proc proc rw\n", "0::/\n").version == 0


def test_spec_modes_decide_the_policy(monkeypatch):
    from service import settings
    from tests.configs import spec_with

    isolation = {"vm_user": "vmu", "memory_overhead_mib": 300, "cpu_overhead": 0.25, "pids_max": 64}
    policy = jail_policy(user="vmu", memory_overhead_mib=300, cpu_overhead=0.25, pids_max=64)
    assert policy.user == "vmu" and policy.pids_max == 64
    assert settings._isolation(spec_with(isolation={**isolation, "jail": "on"}), None) == policy
    assert settings._isolation(spec_with(isolation={**isolation, "jail": "off"}), None) is None
    monkeypatch.setattr(settings, "jail_unavailable", lambda: "not root")
    assert settings._isolation(spec_with(isolation={**isolation, "jail": "auto"}), None) is None
    assert settings._isolation(spec_with(isolation={**isolation, "jail": "on"}), None) == policy  # on: no fallback
    monkeypatch.setattr(settings, "jail_unavailable", lambda: None)
    assert settings._isolation(spec_with(isolation={**isolation, "jail": "auto"}), None) == policy


def test_sweep_removes_only_old_empty_vm_cgroups(tmp_path, monkeypatch):
    import os
    import shutil

    from service.engine.jail import sweep_stale_cgroups

    # cgroupfs removes a cgroup with its control files in it; a plain directory needs rmtree to look the same
    monkeypatch.setattr(Path, "rmdir", lambda self: shutil.rmtree(self))
    for name, procs in (("vm-a", ""), ("vm-b", "123\n"), ("vm-c", ""), ("keep", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.procs").write_text(procs)
        if name != "vm-c":
            os.utime(tmp_path / name, (0, 0))
    sweep_stale_cgroups(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vm-b", "vm-c", "keep"}


def test_paths_the_host_opened_are_bound_by_descriptor_never_by_name():
    """What the launcher checked is what QEMU sees: bwrap binds the descriptor (and closes it before QEMU runs);
    a path bound by name would be whatever a swap made of it by then."""
    fds = {MACHINE.rootfs: 11, MACHINE.kernel: 12, MACHINE.initrd: 13, VM_DIR: 14, MACHINE.memory_file: 15}
    args = argv(fds=fds)
    assert not MACHINE.memory_shared  # a copy's RAM file: bound read-only, by its descriptor too
    assert set(pairs(args, "--ro-bind-fd")) == {("11", str(MACHINE.rootfs)), ("12", str(MACHINE.kernel)),
                                                ("13", str(MACHINE.initrd)), ("15", str(MACHINE.memory_file))}
    assert set(pairs(args, "--bind-fd")) == {("14", str(VM_DIR))}
    assert not [p for p in pairs(args, "--ro-bind") + pairs(args, "--bind") if p[0].startswith(str(IMG))]
