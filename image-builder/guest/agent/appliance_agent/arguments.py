"""Checking the arguments of host requests, and small texts built from them (for the agent)."""

from __future__ import annotations

import math

from appliance_agent import envs, protocol

# Only for annotations (never evaluated, see the __future__ import): `typing` costs boot time under TCG.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_SEED_BYTES = 4096


class BadRequest(Exception):
    """A request with missing or ill-typed arguments."""


class ExecArgs:
    """The checked arguments of an exec request (a plain class: `dataclasses` costs boot time under TCG)."""

    def __init__(self, message: dict[str, Any]) -> None:
        code = message.get("code")
        if not isinstance(code, str):
            raise BadRequest("code must be a string")
        language = message.get("language") or "python"
        if language not in protocol.LANGUAGES:
            raise BadRequest(f"language must be one of {sorted(protocol.LANGUAGES)}")
        output_cap = message.get("output_cap")
        if output_cap is None:
            output_cap = protocol.DEFAULT_OUTPUT_CAP
        elif not is_int(output_cap) or output_cap < 0:
            raise BadRequest("output_cap must be a non-negative integer")
        self.code: str = code
        self.language: str = language
        self.timeout_s = number(message, "timeout_s", None, allow_zero=False)
        grace_s = number(message, "grace_s", protocol.DEFAULT_GRACE_S, allow_zero=True)
        assert grace_s is not None
        self.grace_s: float = grace_s
        self.output_cap: int = output_cap
        try:
            self.envs: dict[str, str] = envs.check(message.get("envs"))
        except envs.EnvError as exc:
            raise BadRequest(str(exc)) from None


def seed(message: dict[str, Any]) -> bytes:
    seed_hex = message.get("seed_hex")
    try:
        data = bytes.fromhex(seed_hex) if isinstance(seed_hex, str) else b""
    except ValueError:
        data = b""
    if not data or len(data) > MAX_SEED_BYTES:
        raise BadRequest(f"seed_hex must be 1 to {MAX_SEED_BYTES} bytes as hexadecimal")
    return data


def unix_ns(message: dict[str, Any]) -> int:
    value = message.get("unix_ns")
    if not is_int(value) or value < 0:
        raise BadRequest("unix_ns must be a non-negative integer")
    return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(message: dict[str, Any], name: str, default: float | None, *, allow_zero: bool) -> float | None:
    value = message.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise BadRequest(f"{name} must be {'non-negative' if allow_zero else 'positive'}")
    return float(value)


def error(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value, "traceback": ""}


def seconds(value: float) -> str:
    """3.0 -> '3', 0.5 -> '0.5': for messages read by people and language models."""
    return f"{value:g}"
