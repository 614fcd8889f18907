"""The engine's public face: boot sandboxes from one guest image with one accelerator choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import accel
from .errors import BootFailed
from .image import GuestImage
from .jail import Jail, JailPolicy
from .launcher import LauncherClient
from .machine import MachineConfig
from .sandbox import ExecLimits, Sandbox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Built from the spec by service/settings.py (the spec holds every default)."""

    image_dir: Path
    run_dir: Path
    accelerator: str  # auto | kvm | tcg
    vcpus: int
    memory_mib: int
    boot_timeout_s: float
    kvm_probe_timeout_s: float
    limits: ExecLimits
    isolation: JailPolicy | None  # None: QEMU runs as the service's user, unjailed
    launcher_socket: Path | None  # not root: jailing goes through the root launcher listening here


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.image = GuestImage.load(config.image_dir)
        self._accelerator: accel.AcceleratorChoice | None = None
        self._jail: Jail | LauncherClient | None = None

    @property
    def jail(self) -> Jail | LauncherClient | None:
        """The VMM jail every VM of this engine runs in (None when isolation is off): a Jail when this process
        is root, else the root launcher's client. Made once: it may create the VM user and reads the cgroup
        layout."""
        if self._jail is None and self.config.isolation is not None and self.config.launcher_socket is not None:
            self._jail = LauncherClient(self.config.launcher_socket)
            log.info("VMs are started jailed by the launcher at %s (VM uid %d)", self.config.launcher_socket,
                     self._jail.identity.uid)
        if self._jail is None and self.config.isolation is not None:
            self._jail = Jail(self.config.isolation)
            log.info("VMs run jailed as %s (uid %d), cgroup v%d", self.config.isolation.user,
                     self._jail.identity.uid, self._jail.layout.version)
        return self._jail

    @property
    def accelerator(self) -> accel.AcceleratorChoice:
        """Chosen once per engine (and cached per host boot on disk): the KVM probe costs a boot."""
        if self._accelerator is None:
            cache = accel.verdict_cache_file(self.config.run_dir)
            self._accelerator = accel.cached_choice(
                cache,
                key=f"{self.config.accelerator}:{self.image.image_id}",
                decide=lambda: accel.choose_accelerator(
                    self.config.accelerator, accel.kvm_device_problem, self._probe_kvm_boot
                ),
            )
            log.info("accelerator: %s (%s)", self._accelerator.name, self._accelerator.reason)
        return self._accelerator

    def machine(self, accelerator: str | None = None, vcpus: int | None = None, memory_mib: int | None = None,
                **overrides) -> MachineConfig:
        return MachineConfig(
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            rootfs=self.image.rootfs,
            kernel_args=self.image.kernel_args,
            accelerator=accelerator or self.accelerator.name,
            vcpus=vcpus or self.config.vcpus,
            memory_mib=memory_mib or self.config.memory_mib,
            tsc_khz=accel.host_tsc_khz(),
            **overrides,
        )

    def boot(self, vcpus: int | None = None, memory_mib: int | None = None, die_with_parent: bool = False) -> Sandbox:
        return Sandbox.boot(
            self.machine(vcpus=vcpus, memory_mib=memory_mib),
            self.config.run_dir,
            self.config.limits,
            self.config.boot_timeout_s,
            die_with_parent=die_with_parent,
            jail=self.jail,
        )

    def _probe_kvm_boot(self) -> str | None:
        try:
            sandbox = Sandbox.boot(
                self.machine(accelerator="kvm", memory_mib=256),
                self.config.run_dir,
                self.config.limits,
                self.config.kvm_probe_timeout_s,
                die_with_parent=True,
                jail=self.jail,
            )
        except (BootFailed, OSError) as exc:
            return f"a probe guest did not boot under KVM: {str(exc)[:200]}"
        sandbox.close()
        return None
