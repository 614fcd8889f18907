"""`appliance keys` against a real `appliance serve` (gunicorn, 2 workers, real microVMs): a key added with the
installed CLI works at once, without a restart, on every worker; a rotated key keeps its sandbox; a revoked one gets
401; /metrics answers a metrics key only.

One service for the module, with a trivial warm_code and no pool (one template boot in all).
"""

from __future__ import annotations

import httpx
import pytest

from tests.live_service import LiveService

pytestmark = pytest.mark.integration

HANG_DEADLINE_S = 120  # a sandbox create or exec under TCG: seconds; only a hang reaches this


@pytest.fixture(scope="module")
def live():
    service = LiveService(workers=2, pool_size=0, env_extra={"APPLIANCE_SERVICE__WARM_CODE": "x = 0"})
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _cli_key(live: LiveService, *argv: str) -> tuple[str, str]:
    """(the key printed on stdout, stderr) of `appliance keys ...` as an operator on the node runs it."""
    result = live.cli("keys", *argv)
    assert result.returncode == 0, result.stderr
    (key,) = result.stdout.split()
    return key, result.stderr


def _key_id(live: LiveService, name: str) -> str:
    listed = live.cli("keys", "list")
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if f" {name} " in line]
    return line.split()[0]


def _every_worker(live: LiveService, method: str, path: str, key: str, **kwargs) -> list[httpx.Response]:
    """The same call on fresh connections until both workers have answered it (new connections spread over them)."""
    answers, workers = [], set()
    for _ in range(400):  # cheap calls; many, so that a busy host cannot make one worker win every accept
        response = httpx.request(method, f"{live.url}{path}", headers=live.headers(key), timeout=HANG_DEADLINE_S,
                                 **kwargs)
        answers.append(response)
        workers.add(response.headers["x-appliance-worker"])
        if len(workers) == live.workers:
            break
    assert len(workers) == live.workers, f"only workers {workers} answered"
    return answers


def test_a_key_added_with_the_cli_works_at_once_rotates_without_losing_its_sandbox_and_revokes(live):
    key, said = _cli_key(live, "add", "erin")
    key_id = _key_id(live, "erin")
    assert key_id in said and key not in live.cli("keys", "list").stdout
    assert all(r.status_code == 200 for r in _every_worker(live, "GET", "/v1/sandboxes", key))  # no restart
    with httpx.Client(base_url=live.url, headers=live.headers(key), timeout=HANG_DEADLINE_S) as client:
        created = client.post("/v1/sandboxes", json={})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["id"]
        assert client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 41"}).status_code == 200

    new_key, _ = _cli_key(live, "rotate", key_id, "--overlap", "0s")
    assert all(r.status_code == 401 for r in _every_worker(live, "GET", f"/v1/sandboxes/{sandbox_id}", key))
    with httpx.Client(base_url=live.url, headers=live.headers(new_key), timeout=HANG_DEADLINE_S) as client:
        ran = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x + 1"})
        assert ran.status_code == 200 and ran.json()["text"] == "42"  # same key id: same sandbox, same state
        assert [s["id"] for s in client.get("/v1/sandboxes").json()["sandboxes"]] == [sandbox_id]
    assert httpx.get(f"{live.url}/v1/sandboxes/{sandbox_id}", headers=live.headers(),
                     timeout=HANG_DEADLINE_S).status_code == 404  # still nobody else's

    revoked = live.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    answers = _every_worker(live, "GET", "/v1/sandboxes", new_key)
    assert all(r.status_code == 401 and r.json()["error"]["code"] == "unauthorized" for r in answers)
    httpx.delete(f"{live.url}/v1/sandboxes/{sandbox_id}", headers=live.headers(new_key), timeout=HANG_DEADLINE_S)


def test_metrics_answer_a_metrics_key_only(live):
    assert all(r.status_code == 403 for r in _every_worker(live, "GET", "/metrics", live.key))
    scraper, _ = _cli_key(live, "add", "prometheus", "--metrics")
    for response in _every_worker(live, "GET", "/metrics", scraper):
        assert response.status_code == 200 and "appliance_requests_total" in response.text
    assert _every_worker(live, "GET", "/v1/sandboxes", scraper)[0].status_code == 403
    configured = _every_worker(live, "GET", "/metrics", live.metrics_key)  # APPLIANCE_METRICS_KEYS
    assert all(r.status_code == 200 for r in configured)
