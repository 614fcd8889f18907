"""What the API tests share: the two keys' headers, the error shape every failure must have, and the calls that
several modules make (a fork, a streamed exec)."""

from __future__ import annotations

import json

from .fakes import KEY_A, KEY_B, KEY_METRICS

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
M = {"Authorization": f"Bearer {KEY_METRICS}"}  # Prometheus's


def assert_error(result, status: int, code: str) -> dict:
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in result.text
    return body["error"]


def stream(client, sandbox_id: str, code: str) -> tuple[object, list[dict]]:
    result = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec",
        json={"code": code},
        headers={**A, "Accept": "application/x-ndjson"},
    )
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/x-ndjson"
    assert result.text.endswith("\n")
    return result, [json.loads(line) for line in result.text.splitlines()]



def fork(client, sandbox_id: str, body=None, headers=A):
    return client.simulate_post(f"/v1/sandboxes/{sandbox_id}/fork", json=body, headers=headers)

