"""One live service for the reliability suite's short runs (fuzz, then load): its template warm-up is the costly part
under TCG, so both modules share it. The sizes here keep each generated or simulated call cheap: fork makes at most
2 copies, an exec stops after 20 s, and a key may hold 16 sandboxes."""

from __future__ import annotations

import secrets

import httpx
import pytest

from tests.live_service import LiveService

RELIABILITY_ENV = {
    "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": "16",
    "APPLIANCE_SERVICE__MAX_FORK": "2",
    "APPLIANCE_ENGINE__EXEC_TIMEOUT_S": "20",
}


@pytest.fixture(scope="package")
def live():
    # a cgroup parent of its own: the leak inventory (leaks.py) counts this service's VM cgroups, no other's
    cgroup = {"APPLIANCE_ISOLATION__CGROUP_NAME": f"appliance-vms-test-{secrets.token_hex(4)}"}
    service = LiveService(workers=2, pool_size=2, env_extra={**RELIABILITY_ENV, **cgroup}, ready_timeout_s=900)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def delete_all(live: LiveService, keep: frozenset[str] = frozenset()) -> None:
    """Close every sandbox both keys hold (but `keep`), so the next module starts from an empty service."""
    for key in (live.key, live.other_key):
        with live.client(key) as api:
            for sandbox in api.get("/v1/sandboxes").json()["sandboxes"]:
                if sandbox["id"] not in keep:
                    api.delete(f"/v1/sandboxes/{sandbox['id']}")


def error_shape_problem(response: httpx.Response | object) -> str | None:
    """Why an error response is not the API's JSON error shape ({"error": {"code", "message"}}), or None."""
    status = response.status_code
    if status < 400:
        return None
    content_type = response.headers.get("content-type", "")
    if isinstance(content_type, list):  # Schemathesis's responses keep every header as a list
        content_type = content_type[0] if content_type else ""
    if not content_type.startswith("application/json"):
        return f"{status} with content type {content_type!r}, not JSON"
    try:
        body = response.json()
    except ValueError:
        return f"{status} whose body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str) and error["code"]
            and isinstance(error.get("message"), str) and error["message"]):
        return f"{status} whose body is not {{'error': {{'code', 'message'}}}}: {str(body)[:200]}"
    if "Traceback" in response.text:
        return f"{status} that carries a traceback"
    return None
