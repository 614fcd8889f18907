"""The engine's public face: every operation the service performs on VMs, for one guest image, one accelerator
choice and one way of starting QEMU (launch.py). Callers hold Sandboxes and plain identifiers (a VM directory, the
machine as JSON, a template); they never reach the launcher, the jail, QMP or the network code themselves.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import accel, deployment_secret, network, snapshot
from .channel import AgentChannel
from .errors import BootFailed, NetworkUnavailable, SandboxLost
from .image import GuestImage
from .jail import Jail, JailPolicy
from .launch import DirectLauncher, JailedLauncher, RemoteLauncher, VmmLauncher
from .machine import MachineConfig, code_user_kernel_args, machine_from_json, machine_to_json
from .netpolicy import NetworkPolicy, ResolvedPolicy, check_private_allow, parse_policy, resolve
from .sandbox import ExecLimits, Sandbox
from .template import Template, TemplateError
from .vm import VirtualMachine

log = logging.getLogger(__name__)
_CONNECT_TIMEOUT_S = 5.0


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
    secret_file: Path  # the deployment's secret (deployment_secret.py): authenticates snapshot metadata
    code_user: str = "sandbox"  # engine.code_user: the guest user of user code (told on the kernel command line)

    @property
    def templates_dir(self) -> Path:
        return self.run_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.run_dir / "sandboxes"


@dataclass(frozen=True)
class NetworkRequest:
    """A sandbox's network policy, checked and its names resolved (at creation, and again at each resume)."""

    policy: NetworkPolicy
    resolved: ResolvedPolicy


class Engine:
    def __init__(self, config: EngineConfig, launcher: VmmLauncher | None = None) -> None:
        """`launcher`: how VMs start; by default chosen from the config when first needed (see `launcher`)."""
        self.config = config
        self.image = GuestImage.load(config.image_dir)
        self._accelerator: accel.AcceleratorChoice | None = None
        self._launcher = launcher
        self._secret: bytes | None = None

    # ---- what this engine runs on ------------------------------------------------------------------------------

    @property
    def launcher(self) -> VmmLauncher:
        """How this engine's VMs start (made once: a jail may create the VM user and reads the cgroup layout)."""
        if self._launcher is None:
            isolation, socket_path = self.config.isolation, self.config.launcher_socket
            if isolation is not None and socket_path is not None:
                remote = RemoteLauncher(socket_path)
                log.info("VMs are started jailed by the launcher at %s (VM uid %d)", socket_path,
                         remote.identity.uid)
                self._launcher = remote
            elif isolation is not None:
                jail = Jail(isolation)
                log.info("VMs run jailed as %s (uid %d), cgroup v%d", isolation.user, jail.identity.uid,
                         jail.layout.version)
                self._launcher = JailedLauncher(jail)
            else:
                self._launcher = DirectLauncher()
        return self._launcher

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
                **overrides: Any) -> MachineConfig:
        return MachineConfig(
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            rootfs=self.image.rootfs,
            kernel_args=self.image.kernel_args,
            accelerator=accelerator or self.accelerator.name,
            vcpus=vcpus or self.config.vcpus,
            memory_mib=memory_mib or self.config.memory_mib,
            tsc_khz=accel.host_tsc_khz(),
            extra_kernel_args=code_user_kernel_args(self.config.code_user),
            **overrides,
        )

    # ---- starting sandboxes -------------------------------------------------------------------------------------

    def boot(self, vcpus: int | None = None, memory_mib: int | None = None, die_with_parent: bool = False,
             detach: bool = False, vm_id: str | None = None, agent_ports: int = 1) -> Sandbox:
        """A cold boot. Tied to this process (`die_with_parent`, the CLI) or detached from it (the service)."""
        machine = self.machine(vcpus=vcpus, memory_mib=memory_mib, agent_ports=agent_ports)
        run_dir = self.config.sandboxes_dir if detach else self.config.run_dir
        return Sandbox.boot(machine, run_dir, self.config.limits, self.config.boot_timeout_s, self.launcher,
                            die_with_parent=die_with_parent, detach=detach, vm_id=vm_id)

    def make_template(self, agent_ports: int, warm_code: str, boot_timeout_s: float | None = None) -> Template:
        """Boot, run `warm_code` (imports), save: the warm state clones start from. `boot_timeout_s`: instead of
        engine.boot_timeout_s (the pool keeper gives a slow host more time on each try)."""
        return Template.create(self.machine(agent_ports=agent_ports), self.config.templates_dir, self.config.limits,
                               boot_timeout_s or self.config.boot_timeout_s, self.launcher, warm_code=warm_code)

    def template_fits(self, template: Template, agent_ports: int) -> bool:
        """Was `template` made for this image, accelerator and size? (Equal but for where its RAM lives.)"""
        def plain(machine: MachineConfig) -> MachineConfig:
            return replace(machine, memory_file=None, memory_shared=True, memory_offset=0)

        return plain(template.machine) == plain(self.machine(agent_ports=agent_ports))

    def clone(self, template: Template, vm_id: str) -> Sandbox:
        """A detached copy of the template's warm state, reseeded, its clock set."""
        return template.clone(self.config.sandboxes_dir, self.config.limits, self.launcher, vm_id=vm_id,
                              detach=True)

    def fork(self, sandbox: Sandbox, vm_ids: list[str], networked: bool) -> tuple[Template, list[Sandbox]]:
        """len(vm_ids) detached copies of the sandbox's live state; the sandbox keeps running. The copies map the
        returned template's RAM: remove it when the last of them is gone. On failure nothing new is left."""
        with _monitor_released(sandbox), self._quiet_nic(sandbox, networked):
            return snapshot.fork(sandbox, len(vm_ids), self.config.templates_dir, self.config.sandboxes_dir,
                                 self.config.limits, self.launcher, detach=True, vm_ids=vm_ids)

    def snapshot(self, sandbox: Sandbox, networked: bool) -> Template:
        """The sandbox's live state as a template new sandboxes are cloned from (Engine.clone), as a fork's copies
        are; the sandbox keeps running. On failure nothing new is left."""
        with _monitor_released(sandbox), self._quiet_nic(sandbox, networked):
            return snapshot.capture(sandbox, self.config.templates_dir)

    def template(self, template_id: str) -> Template:
        """A template this engine made (TemplateError if it is gone or incomplete); `template_id` is checked to be
        a template's name, never a path."""
        if (not template_id.startswith("tpl-") or not template_id[4:].isascii() or not template_id[4:].isalnum()
                or len(template_id) > 40):
            raise TemplateError(f"{template_id!r} is not a template id")
        return Template.load(self.config.templates_dir / template_id)

    def freeze(self, sandbox: Sandbox, directory: Path, compress: bool, networked: bool) -> None:
        """Write the sandbox's whole state to `directory` and stop its VM; on failure it keeps running."""
        with _monitor_released(sandbox), self._quiet_nic(sandbox, networked):
            snapshot.freeze(sandbox, directory, self.image.image_id, self.secret, compress=compress)

    def resume(self, directory: Path, vm_id: str) -> Sandbox:
        """A detached sandbox from a frozen one: SnapshotTampered if its metadata fails authentication,
        SnapshotMismatch if this host cannot restore it faithfully. The machine is this engine's own, in the
        snapshot's size."""
        frozen = snapshot.Snapshot.load(directory, self.secret)
        return snapshot.resume(frozen, self.machine(**frozen.shape()), self.config.sandboxes_dir, self.config.limits,
                               self.image.image_id, self.launcher, vm_id=vm_id, detach=True)

    @property
    def secret(self) -> bytes:
        """The deployment's secret, read (or made, on a first start) when first needed."""
        if self._secret is None:
            self._secret = deployment_secret.read_or_create(self.config.secret_file)
        return self._secret

    # ---- sandboxes other processes started --------------------------------------------------------------------

    def connect(self, vm_dir: Path, machine_json: dict[str, Any], port: int) -> Sandbox:
        """This process's connection to a running VM on agent `port` (SandboxLost if it is not running)."""
        machine = machine_from_json(machine_json)
        try:
            vm = VirtualMachine.attach(machine, vm_dir)
        except (OSError, ValueError) as exc:
            raise SandboxLost(f"no VM in {vm_dir.name}: {exc}") from None
        if vm.exited() is not None:
            raise SandboxLost(f"the VM in {vm_dir.name} is not running")
        channel = AgentChannel.connect(vm.paths.agent_socket(port), time.monotonic() + _CONNECT_TIMEOUT_S)
        return Sandbox(vm, channel, self.config.limits)

    def is_running(self, vm_dir: Path, machine_json: dict[str, Any]) -> bool:
        try:
            vm = VirtualMachine.attach(machine_from_json(machine_json), vm_dir)
        except (OSError, ValueError):
            return False
        return vm.exited() is None

    def stop(self, vm_dir: Path, machine_json: dict[str, Any]) -> None:
        """Stop a VM and remove its files, whichever process started it; a VM already gone is fine."""
        with contextlib.suppress(OSError, ValueError):
            VirtualMachine.attach(machine_from_json(machine_json), vm_dir).stop()

    def unowned_vm_dirs(self, owned_ids: set[str], min_age_s: float) -> list[Path]:
        """VM dirs of sandboxes (vm-<id>, or vm-<id>-<4 hex> for a resumed one) whose id is not in `owned_ids`,
        older than `min_age_s`: VMs a process started and died before registering (the pool keeper killed while it
        cloned). Stop them with stop_dir."""
        found = []
        now = time.time()
        for vm_dir in sorted(self.config.sandboxes_dir.glob("vm-*")):
            name = vm_dir.name.removeprefix("vm-")
            if name in owned_ids or name.rsplit("-", 1)[0] in owned_ids:
                continue
            try:
                if now - vm_dir.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            found.append(vm_dir)
        return found

    @staticmethod
    def stop_dir(vm_dir: Path) -> None:
        """Stop the VM of a directory whose machine nobody recorded (unowned_vm_dirs) and remove its files."""
        VirtualMachine.for_dir(vm_dir).stop()

    @staticmethod
    def machine_json(sandbox: Sandbox) -> dict[str, Any]:
        """The machine as the registry keeps it (what connect and stop take back)."""
        return machine_to_json(sandbox.vm.config)

    @staticmethod
    def memory_mib(machine_json: dict[str, Any]) -> int:
        return machine_from_json(machine_json).memory_mib

    @staticmethod
    def agent_ports(machine_json: dict[str, Any]) -> int:
        """How many agent connections the VM takes (port 0 belongs to whoever starts or restores it)."""
        return machine_from_json(machine_json).agent_ports

    # ---- networks ----------------------------------------------------------------------------------------------

    def network_request(self, requested: dict[str, Any] | None, settings: network.NetworkSettings
                        ) -> NetworkRequest | None:
        """The policy ({"egress": ...}) checked and its names resolved; None for no network. PolicyError for a
        bad policy (or one naming what is not public and not opted in), NetworkUnavailable when this host cannot
        give sandboxes networks."""
        policy = parse_policy(None if requested is None else {"egress": requested.get("egress")})
        if policy is None:
            return None
        why = self.launcher.network_unavailable()
        if why is not None:
            raise NetworkUnavailable(f"this host cannot give sandboxes a network: {why}")
        return NetworkRequest(policy, resolve(policy, private_allow=check_private_allow(settings.private_allow)))

    def give_network(self, sandbox: Sandbox, request: NetworkRequest, settings: network.NetworkSettings
                     ) -> dict[str, Any]:
        """Attach the network; returns what the registry keeps of it (the policy plus the new identity)."""
        with _monitor_released(sandbox):
            attachment = network.attach(sandbox.vm, sandbox.call, request.resolved, settings, self.launcher)
        return {**request.policy.to_json(), **attachment.describe()}

    def remove_network_leftovers(self) -> list[str]:
        """Networks this service made for VMs that are gone (a crash between claim and teardown)."""
        return network.remove_leftovers(self.config.sandboxes_dir)

    @staticmethod
    def _quiet_nic(sandbox: Sandbox, networked: bool) -> contextlib.AbstractContextManager[None]:
        """A networked sandbox's state is saved with its NIC link down (see network.link_down)."""
        return network.link_down(sandbox.vm) if networked else contextlib.nullcontext()

    # ---- the accelerator probe ----------------------------------------------------------------------------------

    def _probe_kvm_boot(self) -> str | None:
        try:
            sandbox = Sandbox.boot(self.machine(accelerator="kvm", memory_mib=256), self.config.run_dir,
                                   self.config.limits, self.config.kvm_probe_timeout_s, self.launcher,
                                   die_with_parent=True)
        except (BootFailed, OSError) as exc:
            return f"a probe guest did not boot under KVM: {str(exc)[:200]}"
        sandbox.close()
        return None


@contextlib.contextmanager
def _monitor_released(sandbox: Sandbox) -> Iterator[None]:
    """QEMU's monitor serves one client at a time, and any API worker may be the next to fork, freeze or network
    this VM: drop this process's monitor connection when the operation is done, whatever happened."""
    try:
        yield
    finally:
        sandbox.vm.close_monitor()
