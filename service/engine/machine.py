"""What one microVM is made of, and the one function that turns that into a QEMU command line. Pure logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from appliance_agent.protocol import AGENT_PORT_NAME

QEMU_BINARY = "qemu-system-x86_64"
# Debian's kernels are built with HZ=250; lpj must match the TSC rate we announce, or udelay() is wrong.
GUEST_KERNEL_HZ = 250


@dataclass(frozen=True)
class MachineConfig:
    """Everything that decides a sandbox VM's QEMU command line (and so must match between save and restore)."""

    kernel: Path
    initrd: Path
    rootfs: Path
    accelerator: str  # "kvm" or "tcg", already chosen
    vcpus: int = 1
    memory_mib: int = 1024
    # Guest RAM as a file (a tmpfs path) instead of anonymous memory: needed to save a template that clones
    # map copy-on-write. share=True writes go to the file; share=False maps it privately (a clone).
    memory_file: Path | None = None
    memory_shared: bool = True
    # Host TSC frequency handed to the guest under TCG: without it, boots hang now and then calibrating the TSC.
    tsc_khz: int | None = None
    extra_kernel_args: tuple[str, ...] = ()
    qemu_binary: str = QEMU_BINARY

    def __post_init__(self) -> None:
        if self.accelerator not in {"kvm", "tcg"}:
            raise ValueError(f"accelerator must be 'kvm' or 'tcg', not {self.accelerator!r}")
        if self.vcpus < 1 or self.memory_mib < 64:
            raise ValueError("a VM needs at least 1 vCPU and 64 MiB")


@dataclass(frozen=True)
class RuntimePaths:
    """Per-VM files on the host: they differ between a VM and its clones, the machine does not."""

    agent_socket: Path
    qmp_socket: Path
    console_log: Path
    incoming: str | None = None  # a migration URI to restore from, e.g. "exec:cat /path/state"
    extra_args: tuple[str, ...] = field(default=())


def kernel_command_line(config: MachineConfig) -> str:
    args = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "root=/dev/vda", "ro"]
    args += ["8250.nr_uarts=1", "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "cryptomgr.notests", "random.trust_cpu=on"]
    if config.accelerator == "tcg" and config.tsc_khz:
        args += [f"tsc_early_khz={config.tsc_khz}", f"lpj={config.tsc_khz * 1000 // GUEST_KERNEL_HZ}", "tsc=reliable"]
    args += list(config.extra_kernel_args)
    return " ".join(args)


def build_qemu_command(config: MachineConfig, paths: RuntimePaths) -> list[str]:
    """The full argv for one sandbox VM. The only place a QEMU command line is assembled."""
    machine = "microvm,x-option-roms=off,rtc=on,pcie=off"
    memory: list[str] = ["-m", f"{config.memory_mib}M"]
    if config.memory_file is not None:
        share = "on" if config.memory_shared else "off"
        memory += [
            "-object",
            f"memory-backend-file,id=ram,size={config.memory_mib}M,mem-path={config.memory_file},share={share}",
        ]
        machine += ",memory-backend=ram"
    accel = ["-accel", "kvm", "-cpu", "host"] if config.accelerator == "kvm" else [
        "-accel", "tcg,tb-size=64", "-cpu", "max",
    ]
    argv = [
        config.qemu_binary,
        "-M", machine,
        *accel,
        *memory,
        "-smp", str(config.vcpus),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", f"file:{paths.console_log}",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", kernel_command_line(config),
        "-drive", f"id=root,file={config.rootfs},format=raw,if=none,readonly=on,cache=unsafe",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={paths.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-qmp", f"unix:{paths.qmp_socket},server=on,wait=off",
    ]
    if paths.incoming is not None:
        argv += ["-incoming", paths.incoming]
    argv += list(paths.extra_args)
    return argv
