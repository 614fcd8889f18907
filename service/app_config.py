"""Building the service's configuration from the declarative spec (used by the API app and the pool keeper)."""

from __future__ import annotations

from pathlib import Path

from appliance.spec import guest_image_dir, load_spec

from .config import ServiceConfig, resolve_api_keys


def service_config_from_spec(spec_path: Path | None = None) -> ServiceConfig:
    spec = load_spec(spec_path)
    keys, _ = resolve_api_keys(spec.service.api_keys, spec.paths.state_dir)
    return ServiceConfig.from_spec(spec, guest_image_dir(spec), keys)
