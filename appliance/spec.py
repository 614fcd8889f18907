"""The declarative spec: one appliance.toml drives images, engine and service.

Precedence, highest first: values passed by the caller (CLI flags) > APPLIANCE_* environment variables
(nested with "__", e.g. APPLIANCE_GUEST__MEMORY_MIB=2048) > appliance.toml > the defaults below.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_SPEC_FILE = Path("appliance.toml")
SPEC_FILE_ENV = "APPLIANCE_CONFIG"
# A short name for the state directory (`APPLIANCE_STATE_DIR=... appliance serve`); the spec's own variable wins.
STATE_DIR_ENV, SPEC_STATE_DIR_ENV = "APPLIANCE_STATE_DIR", "APPLIANCE_PATHS__STATE_DIR"
_INDEX_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/%+-]*)?")
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance"


class SpecError(Exception):
    """A spec that cannot be used; the message is one line naming the field, the file and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GuestSpec(_Section):
    """What goes into the guest image and how big each sandbox VM is."""

    suite: Literal["bookworm"] = Field("bookworm", description="Debian suite of the guest root filesystem")
    mirror: str = Field("http://deb.debian.org/debian", description="Debian mirror for the guest rootfs")
    kernel_package: str = Field("linux-image-cloud-amd64", description="Debian kernel package for the guest")
    apt_packages: list[str] = Field(default_factory=list, description="extra Debian packages in the guest")
    pip_index_url: str | None = Field(
        None,
        description="the package index `%pip install` in a sandbox uses (the guest network policy must reach it, "
        "and pip must be in the image: python3-pip in apt_packages); unset, %pip says it is not available",
    )
    pip_packages: list[str] = Field(
        default_factory=lambda: [
            "numpy==2.4.6",
            "pandas==3.1.1",
            "scikit-learn==1.9.1",
            "matplotlib==3.11.2",
            "scipy==1.17.1",
        ],
        description="Python packages in the guest, each pinned as name==version",
    )
    vcpus: int = Field(1, ge=1, le=64, description="virtual CPUs per sandbox")
    memory_mib: int = Field(1024, ge=256, le=262144, description="guest memory per sandbox in MiB")
    accelerator: Literal["auto", "kvm", "tcg"] = Field(
        "auto", description="auto probes KVM and falls back to TCG; kvm or tcg forces one"
    )

    @field_validator("pip_index_url")
    @classmethod
    def _index_url(cls, url: str | None) -> str | None:
        if url is not None and not _INDEX_URL.fullmatch(url):
            raise ValueError(f"{url!r} is not an index URL; write it as http(s)://host[:port]/path, e.g. "
                             "'http://10.0.2.2:3141/simple/'")
        return url

    @field_validator("pip_packages")
    @classmethod
    def _pinned(cls, packages: list[str]) -> list[str]:
        for package in packages:
            if not _PIN.match(package):
                raise ValueError(f"{package!r} is not pinned; write it as name==version, e.g. 'numpy==2.4.6'")
        return packages

    def content_hash(self) -> str:
        """Hash of everything that changes the image's bytes (not the VM size), for build caching."""
        image_fields = {k: v for k, v in self.model_dump().items() if k not in {"vcpus", "memory_mib", "accelerator"}}
        if image_fields.get("pip_index_url") is None:  # unset: the same images as before the setting existed
            image_fields.pop("pip_index_url", None)
        return hashlib.sha256(json.dumps(image_fields, sort_keys=True).encode()).hexdigest()


class EngineSpec(_Section):
    """How the sandbox engine runs VMs."""

    boot_timeout_s: float = Field(60.0, gt=0, le=600, description="deadline from QEMU start to agent ready")
    exec_timeout_s: float = Field(60.0, gt=0, le=86400, description="default time limit of one exec")
    interrupt_grace_s: float = Field(
        2.0, gt=0, le=60, description="after a timeout's interrupt, how long before the REPL worker is killed"
    )
    output_cap_bytes: int = Field(1 << 20, ge=1024, description="stdout+stderr kept per exec; the rest is cut")
    result_cap_bytes: int = Field(
        32 << 20, ge=64 << 10,
        description="everything one exec may return (stdout, stderr, displays such as images, the value), counted "
        "on the host; past it output is dropped and counted in truncated_bytes",
    )
    kvm_probe_timeout_s: float = Field(10.0, gt=0, le=120, description="deadline of the KVM probe boot")
    code_user: Literal["sandbox", "root"] = Field(
        "sandbox",
        description="guest user that runs user code: the unprivileged `sandbox` user, or root (an opt-in; user "
        "code can then reach the guest agent and leave its cgroup)",
    )


class ServiceSpec(_Section):
    """The execution API (appliance serve)."""

    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8080, ge=1, le=65535, description="TCP port of the API")
    node_tag: str = Field(
        "", pattern=r"^[a-z0-9]{0,12}$",
        description="this node's name in the sandbox ids it makes (sb-<tag>-<hex>), so a fleet's balancer routes "
                    "each call to the node that holds the sandbox; empty: plain ids (one node)",
    )
    agent_check_port: int | None = Field(
        None, ge=1, le=65535,
        description="TCP port of the HAProxy agent check (free capacity as a weight, or drain) on this node; the "
                    "fleet's balancer polls it. None: off",
    )
    proxy_port: int | None = Field(
        None, ge=1, le=65535,
        description="TLS port of the node's HAProxy in front of the API (the node_proxy role sets it); "
                    "`appliance doctor` checks it",
    )
    workers: int = Field(2, ge=1, le=16, description="gunicorn worker processes (any worker serves any sandbox)")
    api_keys: list[str] = Field(
        default_factory=list,
        description="API keys (prefer APPLIANCE_API_KEYS=k1,k2); if none, serve creates one in the state dir",
    )
    metrics_keys: list[str] = Field(
        default_factory=list,
        description="keys that may read /metrics and nothing else (prefer APPLIANCE_METRICS_KEYS=k1,k2)",
    )
    pool_size: int = Field(2, ge=0, le=64, description="warm clones kept ready so a create is a hand-out")
    warm_code: str = Field(
        "import numpy, pandas, sklearn, sklearn.linear_model, matplotlib, matplotlib.pyplot",
        description="run in the template before it is saved: every sandbox starts with this already done",
    )
    sandbox_timeout_s: float = Field(900.0, gt=0, description="default idle lifetime of a sandbox")
    max_sandboxes_per_key: int = Field(16, ge=1, description="running sandboxes one API key may hold")
    max_sandboxes: int = Field(64, ge=1, description="running sandboxes on this host, all keys together")
    max_body_bytes: int = Field(16 << 20, ge=1024, description="largest JSON request body")
    max_code_bytes: int = Field(1 << 20, ge=64, description="largest code string of one exec")
    max_file_bytes: int = Field(4 << 30, ge=1024, description="largest file upload")
    max_fork: int = Field(64, ge=1, le=256, description="most copies one fork request may make")
    frozen_quota_bytes: int = Field(64 << 30, ge=1 << 20, description="disk all frozen sandboxes may use together")
    compress_snapshots: bool = Field(False, description="zstd-compress frozen sandboxes (smaller, slower)")
    memory_overcommit: float = Field(
        4.0, gt=0, le=64,
        description="guest memory the running and pooled sandboxes may be configured with together, as a multiple "
        "of (host memory - memory_reserve_mib); past it a create, fork or resume gets 507 insufficient_capacity "
        "(idle copies share most of their pages)",
    )
    memory_reserve_mib: int | None = Field(
        None, ge=0,
        description="host memory kept for the host itself: a create, fork or resume that would leave less available "
        "gets 507 insufficient_capacity (default: the larger of 2048 MiB and 10 % of host memory, at most half of it)",
    )
    egress_private_allow: list[str] = Field(
        default_factory=list, max_length=64,
        description="non-public IPv4 ranges (CIDRs) sandboxes with a network policy may reach: by default egress "
        "'all' and allow-lists reach the public internet only (no RFC 1918, CGNAT, link-local/cloud metadata, "
        "loopback, benchmarking or documentation ranges), and never the host's own addresses, opted in or not",
    )

    @field_validator("egress_private_allow")
    @classmethod
    def _cidrs(cls, cidrs: list[str]) -> list[str]:
        for cidr in cidrs:
            try:
                ipaddress.IPv4Network(cidr)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IPv4 CIDR such as '10.20.0.0/16' ({exc})") from None
        return cidrs
    vcpu_overcommit: float = Field(
        8.0, gt=0, le=64,
        description="vCPUs the running and pooled sandboxes may have together, as a multiple of the host's CPUs; past "
        "it a create, fork or resume gets 507 insufficient_capacity (idle guests use little CPU)",
    )
    max_frozen_per_key: int = Field(
        8, ge=1,
        description="frozen sandboxes one API key may hold (its share of frozen_quota_bytes); past it a freeze gets "
        "429 limit_reached and the sandbox keeps running",
    )


class IsolationSpec(_Section):
    """The jail around each sandbox's QEMU process (see docs/security.md)."""

    jail: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run each QEMU as vm_user with no capabilities, QEMU's seccomp sandbox, its own mount/pid/net "
        "namespaces (bubblewrap) and a cgroup with CPU/memory/pids limits; needs root, bwrap and setpriv. "
        "auto: on where possible, else off with a loud warning; on: refuse to run VMs unjailed",
    )
    vm_user: str = Field("appliance-vm", description="unprivileged system user QEMU runs as (created if missing)")
    memory_overhead_mib: int = Field(
        512, ge=64, le=65536, description="cgroup memory limit = guest memory + this (QEMU and its TCG code cache)"
    )
    cpu_overhead: float = Field(
        0.5, ge=0, le=16, description="cgroup CPU limit = one CPU per vCPU + this, for QEMU's own threads"
    )
    pids_max: int = Field(256, ge=16, le=65536, description="cgroup pids limit: threads one QEMU may have")
    cgroup_name: str = Field(
        "appliance-vms", pattern=r"^[A-Za-z0-9._-]+$",
        description="cgroup below the service's own cgroup that holds one cgroup per VM",
    )
    launcher_socket: Path = Field(
        Path("/run/appliance/launcher.sock"),
        description="the root VMM launcher's socket (`appliance launcher`): a service that is not root asks it to "
        "start jailed VMs and attach networks; used when the service is not root and the socket exists",
    )
    launcher_dir: Path = Field(
        Path("/run/appliance-launcher"),
        description="the VMM launcher's own directory for the VM dirs it makes (root's; it and every directory "
        "above it must be writable by root alone). Short: VM socket paths must stay under 108 bytes",
    )
    network_range: str = Field(
        "100.96.0.0/16", pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$",
        description="IPv4 range for sandboxes created with a network policy: 8 addresses each (host link and "
        "guest link); must not overlap the networks sandboxes may reach",
    )


class PathsSpec(_Section):
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="downloads and build stages")
    images_dir: Path | None = Field(None, description="built guest images (default: <cache_dir>/images)")
    state_dir: Path = Field(Path("/var/lib/appliance"), description="sandbox registry, sockets, snapshots")
    run_dir: Path = Field(Path("/dev/shm/appliance"), description="VM memory files and sockets (tmpfs)")
    guest_image: Path | None = Field(
        None, description="boot this built guest image directory instead of the one built for this spec"
    )

    @property
    def images(self) -> Path:
        return self.images_dir or self.cache_dir / "images"


class ApplianceSpec(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    guest: GuestSpec = Field(default_factory=GuestSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    isolation: IsolationSpec = Field(default_factory=IsolationSpec)
    paths: PathsSpec = Field(default_factory=PathsSpec)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _SPEC_FILE_IN_USE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def image_build_dir(spec: ApplianceSpec) -> Path:
    """Where `appliance build guest` puts the image for this spec and this recipe (agent and builder code).

    The recipe is part of the name so that a rebuild after an agent change lands beside the old image: templates,
    snapshots and running sandboxes made from the old files keep them (replacing them in place would hand clones
    a disk that differs from the one in their RAM).
    """
    from appliance.build.guest import recipe_hash  # the builder imports this module

    identity = hashlib.sha256(f"{spec.guest.content_hash()}\0{recipe_hash()}".encode()).hexdigest()
    return spec.paths.images / f"guest-{identity[:16]}"


def guest_image_dir(spec: ApplianceSpec) -> Path:
    """The image sandboxes boot from: an explicitly configured one (e.g. installed by a deploy), else the build."""
    return spec.paths.guest_image if spec.paths.guest_image is not None else image_build_dir(spec)


# pydantic-settings picks sources per class, not per call: load_spec() sets the file for the duration of one load.
_SPEC_FILE_IN_USE: dict[str, Path | None] = {}


def spec_file_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get(SPEC_FILE_ENV, DEFAULT_SPEC_FILE))


def load_spec(path: Path | None = None, overrides: dict[str, Any] | None = None) -> ApplianceSpec:
    """Load the spec; `overrides` are CLI flags as nested dicts, e.g. {"guest": {"vcpus": 2}}.

    A missing default file is fine (defaults apply); a missing file named explicitly is an error.
    """
    explicit = path is not None or SPEC_FILE_ENV in os.environ
    if os.environ.get(STATE_DIR_ENV) and not os.environ.get(SPEC_STATE_DIR_ENV):
        os.environ[SPEC_STATE_DIR_ENV] = os.environ[STATE_DIR_ENV]  # children (gunicorn, the keeper) see it too
    toml_file = spec_file_path(path)
    if not toml_file.exists():
        if explicit:
            raise SpecError(f"{toml_file}: no such spec file (run 'appliance init' to write one)")
        toml_file_or_none = None
    else:
        toml_file_or_none = toml_file
    _SPEC_FILE_IN_USE["path"] = toml_file_or_none
    try:
        return ApplianceSpec(**_merge_overrides(overrides or {}, toml_file_or_none))
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, toml_file_or_none)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise SpecError(f"{toml_file}: {exc}".splitlines()[0]) from None
    finally:
        _SPEC_FILE_IN_USE.pop("path", None)


def _merge_overrides(overrides: dict[str, Any], toml_file: Path | None) -> dict[str, Any]:
    """Init kwargs replace a whole nested section in pydantic-settings; merge CLI flags into the layers below.

    We build the lower layers first (env > file > defaults), then lay the CLI flags over that dict.
    """
    if not overrides:
        return {}
    lower = ApplianceSpec().model_dump()
    for section, values in overrides.items():
        lower.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return lower


def describe_validation_error(exc: ValidationError, toml_file: Path | None) -> str:
    """First problem as one actionable line: field path, where it came from, what is allowed."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"])
    source = str(toml_file) if toml_file is not None else "defaults/environment"
    env_name = "APPLIANCE_" + "__".join(str(part).upper() for part in error["loc"])
    message = error["msg"]
    if error["type"] == "literal_error":
        message = f"must be one of {error['ctx']['expected']}"
    elif error["type"] == "extra_forbidden":
        message = "is not a known setting (check the spelling; 'appliance init' writes every setting)"
    got = error.get("input")
    got_text = f" (got {got!r})" if got is not None and error["type"] != "extra_forbidden" else ""
    return f"{source}: {field}{got_text}: {message} [file key '{field}' or env {env_name}]"
