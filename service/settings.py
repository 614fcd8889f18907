"""The only code of the service that reads the spec (appliance/spec.py): it turns it into the typed configs the
API, the pool keeper, the engine and the launcher run with, and finds the API keys.

The config dataclasses (ServiceConfig here; EngineConfig, ExecLimits, JailPolicy, NetworkSettings in the engine)
have no defaults of their own: every default is a spec field's, written once there. Tests that want the defaults
build them from `ApplianceSpec()` through the functions below.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from appliance.spec import SPEC_FILE_ENV, ApplianceSpec, guest_image_dir, load_spec
from service.engine import EngineConfig, ExecLimits
from service.engine.deployment_secret import read_or_create
from service.engine.jail import JailPolicy, jail_unavailable, warn_once
from service.engine.network import NetworkSettings
from service.keys import METRICS, STORE_FILE, TENANT, KeyRing, KeyStoreError, owner_migration, read_store

__all__ = [
    "API_KEYS_ENV",
    "KEY_FILE_NAME",
    "METRICS_KEYS_ENV",
    "SPEC_FILE_ENV",
    "ApplianceSpec",
    "ServiceConfig",
    "configured_keys",
    "engine_config",
    "exec_limits",
    "jail_policy",
    "key_ring",
    "key_store_path",
    "load",
    "load_service_config",
    "network_settings",
    "owner_ids",
    "resolve_api_keys",
    "service_config",
    "service_key",
]

API_KEYS_ENV = "APPLIANCE_API_KEYS"
METRICS_KEYS_ENV = "APPLIANCE_METRICS_KEYS"
KEY_FILE_NAME = "api-key"
SECRET_FILE_NAME = "deployment.secret"


@dataclass(frozen=True)
class ServiceConfig:
    """What the API and the pool keeper run with (spec sections [service], [paths], [isolation])."""

    engine: EngineConfig
    state_dir: Path
    # Keys from the environment, the spec or the key file (tenant) and for /metrics only: hashed by the key ring
    # (service/keys.py) with the deployment secret; kept out of repr so no log line can show them.
    api_keys: tuple[str, ...] = field(repr=False)
    metrics_keys: tuple[str, ...] = field(repr=False)
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
    node_tag: str = ""  # in every sandbox id this node makes (service/routing.py)
    agent_check_port: int | None = None  # the balancer's agent check (service/agent_check.py); None: off

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

    @property
    def key_store_path(self) -> Path:
        return self.state_dir / STORE_FILE

    @property
    def secret_file(self) -> Path:
        return self.engine.secret_file


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
    return NetworkSettings(sandbox_range=spec.isolation.network_range,
                           private_allow=tuple(spec.service.egress_private_allow))


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
        code_user=spec.engine.code_user,
    )


def secret_file(spec: ApplianceSpec) -> Path:
    """The deployment's secret (service/engine/deployment_secret.py), in the state directory."""
    return spec.paths.state_dir / SECRET_FILE_NAME


def key_store_path(spec: ApplianceSpec) -> Path:
    """The key store `appliance keys` writes and the service re-reads (service/keys.py)."""
    return spec.paths.state_dir / STORE_FILE


# The [service] settings ServiceConfig carries as they are (same names in the spec and the config).
_AS_IN_SPEC = ("pool_size", "warm_code", "sandbox_timeout_s", "max_sandboxes_per_key", "max_sandboxes",
               "max_body_bytes", "max_code_bytes", "max_file_bytes", "max_fork", "frozen_quota_bytes",
               "compress_snapshots", "memory_overcommit", "memory_reserve_mib", "vcpu_overcommit",
               "max_frozen_per_key", "node_tag", "agent_check_port")


def service_config(spec: ApplianceSpec, keys: list[str], image_dir: Path | None = None,
                   metrics_keys: list[str] | None = None) -> ServiceConfig:
    """`metrics_keys`: None takes the spec's service.metrics_keys."""
    service = spec.service
    return ServiceConfig(
        engine=engine_config(spec, image_dir),
        state_dir=spec.paths.state_dir,
        api_keys=tuple(keys),
        metrics_keys=tuple(service.metrics_keys if metrics_keys is None else metrics_keys),
        network=network_settings(spec),
        # one port per gunicorn worker, one for the pool keeper, one spare for a worker being replaced
        agent_ports=min(2 * service.workers + 2, 30),  # each worker may hold two: code and commands
        **{name: getattr(service, name) for name in _AS_IN_SPEC},
    )


def load_service_config(spec_path: Path | None = None) -> ServiceConfig:
    """What an API worker and the pool keeper start with. The keys leave this process's environment once read:
    nothing it starts later inherits them."""
    spec = load(spec_path)
    keys, _ = resolve_api_keys(spec)
    metrics_keys = _from_env(METRICS_KEYS_ENV) or list(spec.service.metrics_keys)
    os.environ.pop(API_KEYS_ENV, None)
    os.environ.pop(METRICS_KEYS_ENV, None)
    return service_config(spec, keys, metrics_keys=metrics_keys)


def _from_env(name: str) -> list[str]:
    return [key.strip() for key in os.environ.get(name, "").split(",") if key.strip()]


def _configured_keys(spec: ApplianceSpec) -> list[str]:
    return _from_env(API_KEYS_ENV) or list(spec.service.api_keys)


def key_file(spec: ApplianceSpec) -> Path:
    return spec.paths.state_dir / KEY_FILE_NAME


def resolve_api_keys(spec: ApplianceSpec) -> tuple[list[str], str | None]:
    """Keys from APPLIANCE_API_KEYS, else the spec, else the key file in the state dir, else (no tenant key in the
    key store either) a new key written there 0600. Returns (keys, newly created key or None). The service never
    runs without a key."""
    configured = _configured_keys(spec)
    if configured:
        return configured, None
    path = key_file(spec)
    if path.exists():
        return [path.read_text().strip()], None
    if _store_has_tenant_keys(spec):
        return [], None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "apl_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return [key], key


def configured_keys(spec: ApplianceSpec) -> list[str]:
    """The tenant keys the local service is given outside the key store (environment, spec, or key file)."""
    configured = _configured_keys(spec)
    if configured:
        return configured
    try:
        key = key_file(spec).read_text().strip()
    except (FileNotFoundError, PermissionError):
        return []
    return [key] if key else []


def service_key(spec: ApplianceSpec) -> str | None:
    """The first key the local service accepts, found where the service looks for it (never created here)."""
    configured = _configured_keys(spec)
    if configured:
        return configured[0]
    try:
        return key_file(spec).read_text().strip() or None
    except FileNotFoundError:
        return None


def _store_has_tenant_keys(spec: ApplianceSpec) -> bool:
    """Does the key store hold a tenant key that is not revoked (then serve need not make a key file)?"""
    try:
        entries = read_store(key_store_path(spec))
    except (KeyStoreError, OSError):
        return False
    return any(entry["kind"] == TENANT and entry["revoked"] is None for entry in entries)


def key_ring(config: ServiceConfig) -> KeyRing:
    """What the API authenticates with: the configured keys and the key store, hashed with the deployment secret."""
    configured = [(key, TENANT) for key in config.api_keys] + [(key, METRICS) for key in config.metrics_keys]
    return KeyRing(read_or_create(config.secret_file), config.key_store_path, configured)


def owner_ids(config: ServiceConfig, found: list[str]) -> dict[str, str]:
    """Owners `found` in a registry from before key ids (SHA-256 of a key) → their key's id (service/keys.py)."""
    return owner_migration(read_or_create(config.secret_file), config.api_keys, found)
