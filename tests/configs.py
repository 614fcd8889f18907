"""Configs for tests, built the way the service builds them: a spec (with the test's own values laid over the
developer's file and environment, as CLI flags are) turned into typed configs by service/settings.py. No test
writes a default of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.spec import ApplianceSpec, load_spec
from service import settings
from service.engine import EngineConfig, ExecLimits
from service.engine.jail import JailPolicy


def spec_with(**sections: dict[str, Any]) -> ApplianceSpec:
    """The spec with `sections` laid over it, e.g. spec_with(guest={"memory_mib": 512})."""
    return load_spec(overrides=sections)


def engine_config(image_dir: Path, **sections: dict[str, Any]) -> EngineConfig:
    return settings.engine_config(spec_with(**sections), image_dir)


def service_config(image_dir: Path, keys: list[str] | tuple[str, ...] = (), **sections: dict[str, Any]
                   ) -> settings.ServiceConfig:
    return settings.service_config(spec_with(**sections), list(keys), image_dir)


def exec_limits(**values: Any) -> ExecLimits:
    """The spec's exec limits, some replaced: exec_limits(timeout_s=10)."""
    names = {"timeout_s": "exec_timeout_s", "grace_s": "interrupt_grace_s", "output_cap": "output_cap_bytes",
             "result_cap": "result_cap_bytes"}
    return settings.exec_limits(spec_with(engine={names[key]: value for key, value in values.items()}))


def jail_policy(**values: Any) -> JailPolicy:
    """The spec's jail settings, some replaced: jail_policy(pids_max=64) (names as in [isolation])."""
    names = {"user": "vm_user"}
    return settings.jail_policy(spec_with(isolation={names.get(key, key): value for key, value in values.items()}))
