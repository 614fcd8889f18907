from pathlib import Path

import pytest

from appliance_agent.protocol import AGENT_PORT_NAME
from service.engine.machine import MachineConfig, RuntimePaths, build_qemu_command, kernel_command_line


def config(**overrides) -> MachineConfig:
    base = dict(kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"), rootfs=Path("/img/rootfs.ext4"),
                accelerator="tcg", vcpus=2, memory_mib=1024, tsc_khz=2_600_000)
    base.update(overrides)
    return MachineConfig(**base)


PATHS = RuntimePaths(agent_socket=Path("/run/vm/agent.sock"), qmp_socket=Path("/run/vm/qmp.sock"),
                     console_log=Path("/run/vm/console.log"))


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_tcg_machine():
    argv = build_qemu_command(config(), PATHS)
    assert argv[0] == "qemu-system-x86_64"
    assert option(argv, "-accel") == ["tcg,tb-size=64"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["1024M"]
    assert option(argv, "-M")[0].startswith("microvm")
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert any("readonly=on" in d and "/img/rootfs.ext4" in d for d in option(argv, "-drive"))
    assert f"socket,id=agent,path={PATHS.agent_socket},server=on,wait=off" in option(argv, "-chardev")
    assert f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}" in option(argv, "-device")
    assert option(argv, "-qmp") == [f"unix:{PATHS.qmp_socket},server=on,wait=off"]
    assert "-incoming" not in argv


def test_tcg_gets_the_host_tsc_rate_and_matching_lpj():
    cmdline = kernel_command_line(config())
    assert "tsc_early_khz=2600000" in cmdline
    assert "lpj=10400000" in cmdline  # 2.6e9 Hz / HZ 250
    assert "root=/dev/vda" in cmdline and "ro" in cmdline.split()


def test_kvm_machine_uses_host_cpu_and_no_tsc_override():
    cfg = config(accelerator="kvm")
    argv = build_qemu_command(cfg, PATHS)
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in kernel_command_line(cfg)


def test_file_backed_memory_for_templates_and_clones():
    shared = build_qemu_command(config(memory_file=Path("/dev/shm/t.mem")), PATHS)
    assert "memory-backend=ram" in option(shared, "-M")[0]
    assert option(shared, "-object") == ["memory-backend-file,id=ram,size=1024M,mem-path=/dev/shm/t.mem,share=on"]
    clone = build_qemu_command(config(memory_file=Path("/dev/shm/t.mem"), memory_shared=False), PATHS)
    assert option(clone, "-object")[0].endswith("share=off")


def test_incoming_migration():
    paths = RuntimePaths(PATHS.agent_socket, PATHS.qmp_socket, PATHS.console_log, incoming="exec:cat /s/state")
    assert option(build_qemu_command(config(), paths), "-incoming") == ["exec:cat /s/state"]


@pytest.mark.parametrize("bad", [dict(accelerator="hvf"), dict(vcpus=0), dict(memory_mib=8)])
def test_invalid_machines_are_refused(bad):
    with pytest.raises(ValueError):
        config(**bad)
