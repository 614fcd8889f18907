"""What one microVM is made of, and the one function that turns that into a QEMU command line. Pure logic."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance_agent.protocol import CODE_USER_ARG, CODE_USERS, agent_port_name

QEMU_BINARY = "qemu-system-x86_64"
MACHINE_TYPE = "microvm"  # recorded in snapshots: state restores only onto the same machine type
# Debian's kernels are built with HZ=250; lpj must match the TSC rate we announce, or udelay() is wrong.
GUEST_KERNEL_HZ = 250
# QEMU's own seccomp filter (jailed VMs): no obsolete syscalls, no set*uid/capset, no fork/exec, no scheduler or
# affinity changes. spawn=deny is why migrations use descriptors the host opens (fd:), never exec: (template.py).
NIC_ID, NIC_HUB_PORT = "nic0", "nichub0"  # the guest NIC and its port on hub 0 (network.py adds the backend's)
SECCOMP_OPTION = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# The guest console: a ring of this many bytes in QEMU (a power of two, as QEMU requires), read on failure.
CONSOLE_ID, CONSOLE_RING_BYTES = "console", 64 << 10


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides a sandbox VM's QEMU command line (and so must match between save and restore)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    accelerator: str  # "kvm" or "tcg", already chosen
    # The guest's own kernel arguments, as its image's manifest gives them (root device, console, quiet...).
    kernel_args: str = "console=ttyS0 root=/dev/vda rootfstype=ext4 ro panic=-1 quiet"
    vcpus: int = 1
    memory_mib: int = 1024
    # Guest RAM as a file (a tmpfs path) instead of anonymous memory: needed to save a template that clones
    # map copy-on-write. share=True writes go to the file; share=False maps it privately (a clone).
    memory_file: Path | None = None
    memory_shared: bool = True
    # Where the guest RAM starts in memory_file: 0 for a plain RAM file, a mapped-ram state's pages_offset
    # (mapped_ram.py) for copies that map a saved state.
    memory_offset: int = 0
    # Host TSC frequency handed to the guest under TCG: without it, boots hang now and then calibrating the TSC.
    tsc_khz: int | None = None
    extra_kernel_args: tuple[str, ...] = ()
    # Agent ports: each is its own host socket, so several host processes (API workers) can each hold one
    # connection to the same guest at once. Part of the machine: saved state only restores onto the same ports.
    agent_ports: int = 1
    # A virtio NIC whose peer is a QEMU hub with no other port: the NIC exists on every VM (so every sandbox can
    # come from one warm template) but carries nothing until the host attaches a backend (network.py). The guest
    # binds no driver to it unless the sandbox is given a network.
    nic: bool = True
    qemu_binary: str = QEMU_BINARY

    def __post_init__(self) -> None:
        if self.accelerator not in {"kvm", "tcg"}:
            raise ValueError(f"accelerator must be 'kvm' or 'tcg', not {self.accelerator!r}")
        if self.vcpus < 1 or self.memory_mib < 64:
            raise ValueError("a VM needs at least 1 vCPU and 64 MiB")
        if self.memory_offset < 0 or self.memory_offset % 4096:
            raise ValueError("memory_offset must be a multiple of 4096")
        if not 1 <= self.agent_ports <= 30:
            raise ValueError("agent_ports must be between 1 and 30 (virtio-serial has 31 ports)")


@dataclass(frozen=True)
class RuntimePaths:
    """Per-VM files on the host, all in the VM's own directory: they differ between a VM and its clones."""

    directory: Path
    incoming: str | None = None  # a migration URI to restore from, or "defer" to give it later over QMP
    # Detach from the starting process (QEMU forks once its sockets exist and writes a pidfile): the VM then
    # outlives API workers, and init reaps it.
    daemonize: bool = False
    seccomp: bool = False  # QEMU's -sandbox (a jailed VM: see jail.py)
    extra_args: tuple[str, ...] = field(default=())

    def agent_socket(self, port: int = 0) -> Path:
        return self.directory / f"agent-{port}.sock"

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"


def code_user_kernel_args(code_user: str) -> tuple[str, ...]:
    """The guest agent runs user code as the unprivileged `sandbox` user unless told root (engine.code_user)."""
    if code_user not in CODE_USERS:
        raise ValueError(f"code_user must be one of {sorted(CODE_USERS)}, not {code_user!r}")
    return () if code_user == "sandbox" else (f"{CODE_USER_ARG}={code_user}",)


def kernel_command_line(config: MachineConfig) -> str:
    """The image's arguments plus what only the host knows: the TSC rate under TCG."""
    args = config.kernel_args.split()
    if config.accelerator == "tcg" and config.tsc_khz:
        args += [f"tsc_early_khz={config.tsc_khz}", f"lpj={config.tsc_khz * 1000 // GUEST_KERNEL_HZ}"]
    args += list(config.extra_kernel_args)
    return " ".join(args)


def build_qemu_command(config: MachineConfig, paths: RuntimePaths) -> list[str]:
    """The full argv for one sandbox VM. The only place a QEMU command line is assembled."""
    # RAM is always a named backend object ("ram"), so its RAM block has the same name whether it is anonymous
    # or a file: a state saved by one kind restores onto the other (freeze a clone, resume into plain RAM).
    # Option ROMs stay on: since QEMU 8 microvm's qboot loads `-kernel` through the linuxboot DMA option ROM (with
    # x-option-roms=off QEMU 10 boots to a silent hang).
    machine = f"{MACHINE_TYPE},rtc=on,pcie=off,memory-backend=ram"
    if config.memory_file is None:
        backend = f"memory-backend-ram,id=ram,size={config.memory_mib}M"
    else:
        backend = f"memory-backend-file,id=ram,size={config.memory_mib}M,mem-path={config.memory_file}"
        if config.memory_shared:
            backend += ",share=on"
        else:
            # A copy: QEMU opens the file read-only and maps it privately (guest writes stay in the copy's own
            # pages), so no copy, nor a compromised QEMU, can change the file every other copy maps.
            backend += ",share=off,readonly=on,rom=off"
        if config.memory_offset:
            backend += f",offset={config.memory_offset}"
    memory = ["-m", f"{config.memory_mib}M", "-object", backend]
    accel = ["-accel", "kvm", "-cpu", "host"] if config.accelerator == "kvm" else [
        "-accel", "tcg,tb-size=64", "-cpu", "max",
    ]
    argv = [
        config.qemu_binary,
        "-M", machine,
        *accel,
        *memory,
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # The guest console is a ring in QEMU's own memory (counted in its cgroup), never a host file: root in
        # the guest can write /dev/ttyS0 as fast as the UART goes (10 MB in 30 s measured), and a `file:` chardev
        # grew without bound on the host's tmpfs. The ring keeps the last CONSOLE_RING_BYTES; a failure report
        # reads it over QMP (vm.py). Why not a file truncated now and then, or a pipe read by the service: both
        # need a process that lives as long as the VM, which a daemonized or launcher-started QEMU has not.
        "-chardev", f"ringbuf,id={CONSOLE_ID},size={CONSOLE_RING_BYTES}",
        "-serial", f"chardev:{CONSOLE_ID}",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_command_line(config),
        "-drive", f"id=root,file={config.rootfs},format=raw,if=none,readonly=on,cache=unsafe",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", f"virtio-serial-device,max_ports={config.agent_ports + 1}",
    ]
    for port in range(config.agent_ports):
        argv += [
            "-chardev", f"socket,id=agent{port},path={paths.agent_socket(port)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent{port},name={agent_port_name(port)},nr={port + 1}",
        ]
    if config.nic:
        argv += [
            "-netdev", f"hubport,id={NIC_HUB_PORT},hubid=0",
            "-device", f"virtio-net-device,netdev={NIC_HUB_PORT},id={NIC_ID}",
        ]
    argv += ["-qmp", f"unix:{paths.qmp_socket},server=on,wait=off"]
    if paths.incoming is not None:
        argv += ["-incoming", paths.incoming]
    if paths.daemonize:
        argv += ["-daemonize", "-pidfile", str(paths.pidfile)]
    if paths.seccomp:
        argv += ["-sandbox", SECCOMP_OPTION]
    argv += list(paths.extra_args)
    return argv


def machine_to_json(machine: MachineConfig) -> dict[str, Any]:
    """JSON form of a machine, stored with templates, snapshots and registry rows."""
    data = asdict(machine)
    for key in ("kernel", "initrd", "rootfs", "memory_file"):
        data[key] = None if data[key] is None else str(data[key])
    data["extra_kernel_args"] = list(machine.extra_kernel_args)
    return data


def machine_from_json(stored: dict[str, Any]) -> MachineConfig:
    data = dict(stored)
    for key in ("kernel", "initrd", "rootfs", "memory_file"):
        data[key] = None if data[key] is None else Path(data[key])
    data["extra_kernel_args"] = tuple(data["extra_kernel_args"])
    data.setdefault("memory_offset", 0)  # machines stored before copies mapped mapped-ram states
    data.setdefault("nic", False)  # machines stored before VMs had a NIC (their saved state has none)
    return MachineConfig(**data)
