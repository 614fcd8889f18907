"""The only code of the service that reads the spec (appliance/spec.py): it turns it into the typed configs the
API, the pool keeper, the engine and the launcher run with, and finds the API keys.

The config dataclasses (ServiceConfig here; EngineConfig, ExecLimits, JailPolicy, NetworkSettings in the engine)
have no defaults of their own: every default is a spec field's, written once there. Tests that want the defaults
build them from `ApplianceSpec()` through the functions below.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from appliance.spec import SPEC_FILE_ENV, ApplianceSpec, guest_image_dir, load_spec
from service.engine import EngineConfig, ExecLimits
from service.engine.jail import JailPolicy, jail_unavailable, warn_once
from service.engine.network import NetworkSettings

__all__ = [
    "API_KEYS_ENV",
    "KEY_FILE_NAME",
    "SPEC_FILE_ENV",
    "ApplianceSpec",
    "ServiceConfig",
    "engine_config",
    "exec_limits",
    "hash_key",
    "jail_policy",
    "load",
    "load_service_config",
    "network_settings",
    "resolve_api_keys",
    "service_config",
    "service_key",
]

API_KEYS_ENV = "APPLIANCE_API_KEYS"
KEY_FILE_NAME = "api-key"
SECRET_FILE_NAME = "deployment.secret"


@dataclass(frozen=True)
class ServiceConfig:
    """What the API and the pool keeper run with (spec sections [service], [paths], [isolation])."""

    engine: EngineConfig
    state_dir: Path
    key_hashes: frozenset[str]
    pool_size: int
    warm_code: str
    sandbox_timeout_s: float
    max_sandboxes_per_key: int
    max_sandboxes: int
    max_body_bytes: int
    max_code_bytes: int
    max_file_bytes: int
    agent_ports: int
    max_fork: int
    frozen_quota_bytes: int
    compress_snapshots: bool
    memory_overcommit: float
    memory_reserve_mib: int | None
    vcpu_overcommit: float
    max_frozen_per_key: int
    network: NetworkSettings

    @property
    def run_dir(self) -> Path:
        return self.engine.run_dir

    @property
    def templates_dir(self) -> Path:
        return self.engine.run_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.engine.run_dir / "sandboxes"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"


def load(spec_path: Path | None = None) -> ApplianceSpec:
    """The spec as every service process reads it (APPLIANCE_CONFIG names the file)."""
    return load_spec(spec_path)


def exec_limits(spec: ApplianceSpec) -> ExecLimits:
    return ExecLimits(
        timeout_s=spec.engine.exec_timeout_s,
        grace_s=spec.engine.interrupt_grace_s,
        output_cap=spec.engine.output_cap_bytes,
        result_cap=spec.engine.result_cap_bytes,
    )


def jail_policy(spec: ApplianceSpec) -> JailPolicy:
    """The jail's settings, whether or not this process will jail (the launcher always does)."""
    section = spec.isolation
    return JailPolicy(
        user=section.vm_user,
        memory_overhead_mib=section.memory_overhead_mib,
        cpu_overhead=section.cpu_overhead,
        pids_max=section.pids_max,
        cgroup_name=section.cgroup_name,
    )


def network_settings(spec: ApplianceSpec) -> NetworkSettings:
    return NetworkSettings(sandbox_range=spec.isolation.network_range)


def _launcher_socket(spec: ApplianceSpec) -> Path | None:
    """The launcher's socket when this process needs it (not root) and it is there."""
    section = spec.isolation
    if os.geteuid() == 0 or section.jail == "off" or not section.launcher_socket.exists():
        return None
    return section.launcher_socket


def _isolation(spec: ApplianceSpec, launcher_socket: Path | None) -> JailPolicy | None:
    """The jail this process's VMs run in, or None (isolation.jail = 'off', or 'auto' where it cannot be had)."""
    if spec.isolation.jail == "off":
        return None
    if spec.isolation.jail == "auto" and launcher_socket is None:
        why = jail_unavailable()
        if why is not None:
            warn_once("jail", f"sandbox VMs run unjailed: {why} (isolation.jail = 'auto')")
            return None
    return jail_policy(spec)


def engine_config(spec: ApplianceSpec, image_dir: Path | None = None) -> EngineConfig:
    """The engine for `image_dir` (default: the spec's guest image)."""
    launcher_socket = _launcher_socket(spec)
    return EngineConfig(
        image_dir=image_dir if image_dir is not None else guest_image_dir(spec),
        run_dir=spec.paths.run_dir,
        accelerator=spec.guest.accelerator,
        vcpus=spec.guest.vcpus,
        memory_mib=spec.guest.memory_mib,
        boot_timeout_s=spec.engine.boot_timeout_s,
        kvm_probe_timeout_s=spec.engine.kvm_probe_timeout_s,
        limits=exec_limits(spec),
        isolation=_isolation(spec, launcher_socket),
        launcher_socket=launcher_socket,
        secret_file=secret_file(spec),
    )


def secret_file(spec: ApplianceSpec) -> Path:
    """The deployment's secret (service/engine/deployment_secret.py), in the state directory."""
    return spec.paths.state_dir / SECRET_FILE_NAME


def hash_key(key: str) -> str:
    """Keys are kept and compared only as hashes; a sandbox's owner is the hash of the key that created it."""
    return hashlib.sha256(key.encode()).hexdigest()


# The [service] settings ServiceConfig carries as they are (same names in the spec and the config).
_AS_IN_SPEC = ("pool_size", "warm_code", "sandbox_timeout_s", "max_sandboxes_per_key", "max_sandboxes",
               "max_body_bytes", "max_code_bytes", "max_file_bytes", "max_fork", "frozen_quota_bytes",
               "compress_snapshots", "memory_overcommit", "memory_reserve_mib", "vcpu_overcommit",
               "max_frozen_per_key")


def service_config(spec: ApplianceSpec, keys: list[str], image_dir: Path | None = None) -> ServiceConfig:
    service = spec.service
    return ServiceConfig(
        engine=engine_config(spec, image_dir),
        state_dir=spec.paths.state_dir,
        key_hashes=frozenset(hash_key(key) for key in keys),
        network=network_settings(spec),
        # one port per gunicorn worker, one for the pool keeper, one spare for a worker being replaced
        agent_ports=min(service.workers + 2, 30),
        **{name: getattr(service, name) for name in _AS_IN_SPEC},
    )


def load_service_config(spec_path: Path | None = None) -> ServiceConfig:
    """What an API worker and the pool keeper start with. The keys leave this process's environment once read:
    nothing it starts later inherits them."""
    spec = load(spec_path)
    keys, _ = resolve_api_keys(spec)
    os.environ.pop(API_KEYS_ENV, None)
    return service_config(spec, keys)


def _configured_keys(spec: ApplianceSpec) -> list[str]:
    from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    return from_env or list(spec.service.api_keys)


def key_file(spec: ApplianceSpec) -> Path:
    return spec.paths.state_dir / KEY_FILE_NAME


def resolve_api_keys(spec: ApplianceSpec) -> tuple[list[str], str | None]:
    """Keys from APPLIANCE_API_KEYS, else the spec, else the key file in the state dir, else a new key written
    there 0600. Returns (keys, newly created key or None). The service never runs without a key."""
    configured = _configured_keys(spec)
    if configured:
        return configured, None
    path = key_file(spec)
    if path.exists():
        return [path.read_text().strip()], None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "apl_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return [key], key


def service_key(spec: ApplianceSpec) -> str | None:
    """The first key the local service accepts, found where the service looks for it (never created here)."""
    configured = _configured_keys(spec)
    if configured:
        return configured[0]
    try:
        return key_file(spec).read_text().strip() or None
    except FileNotFoundError:
        return None
