"""Pure translation between E2B's wire shapes and the appliance's: sandbox records, exec events, errors, and the
in-sandbox access token. No I/O, so it is tested without a VM (tests/unit/test_e2b_translate.py)."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

from service.registry import FROZEN, SandboxRecord

# The SDKs turn envd features on by the version the create reply reports: report none this surface lacks. 0.1.0 is
# the lowest they accept; commands and files (envd's own protocol) are not served yet.
ENVD_VERSION = "0.1.0"
CLIENT_ID = "appliance"
# E2B's template names → the appliance's templates; every one is today's warm template ("default").
TEMPLATES = {"code-interpreter-v1": "default", "base": "default"}
DEFAULT_TEMPLATE = "code-interpreter-v1"
CODE_PORT = 49999  # the SDKs' port for the code-interpreter server (E2b-Sandbox-Port)
# MIME type → the field E2B's Result carries it in (the rest of a bundle goes in `extra`).
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript",
}
_TOKEN_CONTEXT = b"appliance-e2b-access-v1\0"


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_info(record: SandboxRecord) -> dict[str, Any]:
    """A sandbox as E2B's info and list calls describe it (startedAt, endAt, state running|paused, sizes)."""
    machine = record.machine or {}
    return {
        "templateID": DEFAULT_TEMPLATE,
        "sandboxID": record.id,
        "clientID": CLIENT_ID,
        "startedAt": iso(record.created_at),
        # E2B's end is a lifetime; here the timeout is an idle period, so the end moves with every call
        "endAt": iso(record.last_active_at + record.timeout_s),
        "cpuCount": machine.get("vcpus") or 1,
        "memoryMB": machine.get("memory_mib") or 0,
        "diskSizeMB": 0,
        "envdVersion": ENVD_VERSION,
        "state": "paused" if record.state == FROZEN else "running",
        "metadata": {str(k): str(v) for k, v in (record.metadata or {}).items()},
    }


def created(record: SandboxRecord, token: str) -> dict[str, Any]:
    """The reply to a create or connect: what the SDK needs to reach the sandbox."""
    return {
        "templateID": DEFAULT_TEMPLATE,
        "sandboxID": record.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": None,
        "domain": None,
    }


def access_token(secret: bytes, sandbox_id: str, key_id: str) -> str:
    """The in-sandbox credential the create reply hands out (the SDK sends it as X-Access-Token on /execute, which
    carries no API key): the key's id and a MAC over (sandbox, key id) with the deployment secret, so any node of
    the deployment verifies it without storing it."""
    mac = hmac.new(secret, _TOKEN_CONTEXT + f"{sandbox_id}\0{key_id}".encode(), hashlib.sha256).hexdigest()[:40]
    return f"{key_id}.{mac}"


def token_key_id(secret: bytes, sandbox_id: str, token: str) -> str | None:
    """The key id an access token was made for this sandbox, or None if it was not (any other sandbox, a forged
    or truncated token)."""
    if len(token) > 200:
        return None
    key_id, _, _ = token.partition(".")
    expected = access_token(secret, sandbox_id, key_id)
    return key_id if key_id and hmac.compare_digest(expected.encode(), token.encode()) else None


def result_fields(bundle: Any) -> dict[str, Any]:
    """A MIME bundle as E2B's Result fields; unknown types under `extra`."""
    if not isinstance(bundle, dict):
        return {"text": str(bundle)}
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for mime, value in bundle.items():
        name = MIME_FIELDS.get(mime)
        if name is None:
            extra[mime] = value
        else:
            fields[name] = value
    if extra:
        fields["extra"] = extra
    return fields


def execute_lines(event: dict[str, Any], now_ns: int | None = None) -> list[dict[str, Any]]:
    """E2B's /execute lines for one agent event of the appliance's exec (the caller ends the stream)."""
    stamp = time.time_ns() if now_ns is None else now_ns
    kind = event.get("ev")
    if kind in ("stdout", "stderr"):
        return [{"type": kind, "text": event["data"], "timestamp": stamp}]
    if kind == "display":
        return [{"type": "result", **result_fields(event["data"]), "is_main_result": False}]
    if kind == "error":
        return [{"type": "error", "name": "AgentError", "value": str(event.get("message", "")), "traceback": ""}]
    if kind != "done":
        return []
    lines: list[dict[str, Any]] = []
    if event.get("value") is not None:
        lines.append({"type": "result", **result_fields(event["value"]), "is_main_result": True})
    error = event.get("error")
    if error:
        traceback = error.get("traceback", "")
        lines.append({"type": "error", "name": str(error.get("name", "Error")), "value": str(error.get("value", "")),
                      "traceback": "".join(traceback) if isinstance(traceback, list) else str(traceback)})
    return lines


def error_body(status: int, message: str) -> dict[str, Any]:
    """E2B's error shape (the SDKs show `message`)."""
    return {"code": status, "message": message}
