"""The service's configuration, derived once from the spec (and the environment) when a process starts."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from service.engine import EngineConfig
from service.engine.network import NetworkSettings

API_KEYS_ENV = "APPLIANCE_API_KEYS"
KEY_FILE_NAME = "api-key"


def hash_key(key: str) -> str:
    """Keys are kept and compared only as hashes; a sandbox's owner is the hash of the key that created it."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ServiceConfig:
    engine: EngineConfig
    state_dir: Path
    key_hashes: frozenset[str]
    pool_size: int = 2
    warm_code: str = ""
    sandbox_timeout_s: float = 900.0
    max_sandboxes_per_key: int = 16
    max_sandboxes: int = 64
    max_body_bytes: int = 16 << 20
    max_code_bytes: int = 1 << 20
    max_file_bytes: int = 4 << 30
    agent_ports: int = 4
    max_fork: int = 64
    frozen_quota_bytes: int = 64 << 30
    compress_snapshots: bool = False
    network: NetworkSettings = field(default_factory=NetworkSettings)

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

    @classmethod
    def from_spec(cls, spec, image_dir: Path, keys: list[str]) -> ServiceConfig:  # spec: ApplianceSpec
        service = spec.service
        return cls(
            engine=EngineConfig.from_spec(spec, image_dir),
            state_dir=spec.paths.state_dir,
            key_hashes=frozenset(hash_key(key) for key in keys),
            pool_size=service.pool_size,
            warm_code=service.warm_code,
            sandbox_timeout_s=service.sandbox_timeout_s,
            max_sandboxes_per_key=service.max_sandboxes_per_key,
            max_sandboxes=service.max_sandboxes,
            max_body_bytes=service.max_body_bytes,
            max_code_bytes=service.max_code_bytes,
            max_file_bytes=service.max_file_bytes,
            max_fork=service.max_fork,
            frozen_quota_bytes=service.frozen_quota_bytes,
            compress_snapshots=service.compress_snapshots,
            network=NetworkSettings(sandbox_range=spec.isolation.network_range),
            # one port per gunicorn worker, one for the pool keeper, one spare for a worker being replaced
            agent_ports=min(service.workers + 2, 30),
        )


def resolve_api_keys(spec_keys: list[str], state_dir: Path) -> tuple[list[str], str | None]:
    """Keys from APPLIANCE_API_KEYS, else the spec, else the key file in the state dir, else a new key written
    there 0600. Returns (keys, newly created key or None). The service never runs without a key."""
    from_env = [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    if from_env:
        return from_env, None
    if spec_keys:
        return list(spec_keys), None
    key_file = state_dir / KEY_FILE_NAME
    if key_file.exists():
        return [key_file.read_text().strip()], None
    state_dir.mkdir(parents=True, exist_ok=True)
    key = "apl_" + secrets.token_urlsafe(32)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return [key], key
