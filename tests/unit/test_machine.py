from pathlib import Path

import pytest

from service.engine.machine import (
    MachineConfig,
    RuntimePaths,
    build_qemu_command,
    kernel_command_line,
    machine_from_json,
    machine_to_json,
)


def config(**overrides) -> MachineConfig:
    base = dict(
        kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd.img"),
        rootfs=Path("/img/rootfs.ext4"),
        accelerator="tcg",
        vcpus=2,
        memory_mib=1024,
        tsc_khz=2_600_000,
    )
    base.update(overrides)
    return MachineConfig(**base)


PATHS = RuntimePaths(Path("/run/vm"))


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
    assert option(argv, "-chardev") == ["ringbuf,id=console,size=65536",
                                        "socket,id=agent0,path=/run/vm/agent-0.sock,server=on,wait=off"]
    # The guest console is a bounded ring in QEMU, never a file on the host that the guest can grow.
    assert option(argv, "-serial") == ["chardev:console"] and not any("file" in a for a in option(argv, "-chardev"))
    assert "virtserialport,chardev=agent0,name=org.appliance.agent.0,nr=1" in option(argv, "-device")
    assert option(argv, "-qmp") == ["unix:/run/vm/qmp.sock,server=on,wait=off"]
    assert "-incoming" not in argv


def test_tcg_gets_the_host_tsc_rate_and_matching_lpj():
    cmdline = kernel_command_line(config())
    assert "tsc_early_khz=2600000" in cmdline
    assert "lpj=10400000" in cmdline  # 2.6e9 Hz / HZ 250
    assert cmdline.startswith(config().kernel_args)  # the image's own arguments come first, unchanged


def test_kvm_machine_uses_host_cpu_and_no_tsc_override():
    cfg = config(accelerator="kvm")
    argv = build_qemu_command(cfg, PATHS)
    assert option(argv, "-accel") == ["kvm"] and option(argv, "-cpu") == ["host"]
    assert "tsc_early_khz" not in kernel_command_line(cfg)


def test_file_backed_memory_for_templates_and_clones():
    plain = build_qemu_command(config(), PATHS)
    assert "memory-backend=ram" in option(plain, "-M")[0]  # the same RAM block name as file-backed machines
    assert option(plain, "-object") == ["memory-backend-ram,id=ram,size=1024M"]
    shared = build_qemu_command(config(memory_file=Path("/dev/shm/t.mem")), PATHS)
    assert "memory-backend=ram" in option(shared, "-M")[0]
    assert option(shared, "-object") == ["memory-backend-file,id=ram,size=1024M,mem-path=/dev/shm/t.mem,share=on"]
    clone = build_qemu_command(config(memory_file=Path("/dev/shm/t.mem"), memory_shared=False), PATHS)
    # Opened read-only, mapped privately: the guest writes its own copies of pages, never the file.
    assert option(clone, "-object")[0].endswith("share=off,readonly=on,rom=off")
    fork_copy = build_qemu_command(config(memory_file=Path("/dev/shm/t.mem"), memory_shared=False,
                                          memory_offset=1 << 20), PATHS)
    assert option(fork_copy, "-object")[0].endswith("readonly=on,rom=off,offset=1048576")
    with pytest.raises(ValueError, match="memory_offset"):
        config(memory_offset=100)


def test_incoming_migration():
    paths = RuntimePaths(Path("/run/vm"), incoming="exec:cat /s/state")
    assert option(build_qemu_command(config(), paths), "-incoming") == ["exec:cat /s/state"]


@pytest.mark.parametrize("bad", [dict(accelerator="hvf"), dict(vcpus=0), dict(memory_mib=8)])
def test_invalid_machines_are_refused(bad):
    with pytest.raises(ValueError):
        config(**bad)


def test_one_socket_and_port_per_agent_connection():
    argv = build_qemu_command(config(agent_ports=3), PATHS)
    sockets = [c for c in option(argv, "-chardev") if c.startswith("socket,")]
    assert [s.split("path=")[1].split(",")[0] for s in sockets] == [f"/run/vm/agent-{k}.sock" for k in range(3)]
    ports = [d for d in option(argv, "-device") if d.startswith("virtserialport")]
    assert [p.split("name=")[1].split(",")[0] for p in ports] == [f"org.appliance.agent.{k}" for k in range(3)]
    assert "virtio-serial-device,max_ports=4" in option(argv, "-device")


def test_machine_survives_a_json_round_trip():
    import json

    machine = config(memory_file=Path("/dev/shm/t.mem"), memory_shared=False, agent_ports=4)
    assert machine_from_json(json.loads(json.dumps(machine_to_json(machine)))) == machine
