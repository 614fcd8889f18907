"""/exec and /interrupt: results, streaming, and a client that leaves mid-stream."""
from __future__ import annotations

import json
import logging

import falcon
import falcon.inspect
import falcon.testing

from .api_helpers import A, assert_error, stream
from .fakes import BUSY_CODE, CHUNKS_CODE, CRASH_CODE, LOST_CODE


def test_exec_keeps_state_and_returns_the_value(client, sandbox_id):
    path = f"/v1/sandboxes/{sandbox_id}/exec"
    first = client.simulate_post(path, json={"code": "x = 41\nprint('hi')"}, headers=A).json
    assert first["stdout"] == "hi\n" and first["text"] is None and first["results"] == []
    second = client.simulate_post(path, json={"code": "x + 1"}, headers=A).json
    assert second["text"] == "42" and second["results"] == [{"text/plain": "42"}] and second["error"] is None
    assert set(second) == {
        "stdout",
        "stderr",
        "results",
        "text",
        "error",
        "exit_code",
        "truncated_bytes",
        "worker_restarted",
        "worker_exit",
        "duration_s",
    }


def test_exec_error_is_a_result_not_an_http_error(client, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1/0"}, headers=A)
    assert result.status_code == 200
    assert result.json["error"]["name"] == "ZeroDivisionError"


def test_exec_results_are_displays_then_value(client, sandbox_id):
    body = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": CHUNKS_CODE}, headers=A).json
    assert body["stdout"] == "chunk 0\nchunk 1\nchunk 2\n"
    assert [sorted(r) for r in body["results"]] == [["image/png", "text/plain"], ["text/plain"]]
    assert body["text"] == "42"


def test_bash_exec(client, sandbox_id):
    body = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "ls", "language": "bash"}, headers=A
    ).json
    assert body["stdout"] == "bash: ls\n" and body["exit_code"] == 0



def test_streaming_framing(client, sandbox_id):
    _, events = stream(client, sandbox_id, CHUNKS_CODE)
    assert [e["type"] for e in events] == ["stdout", "stdout", "stdout", "result", "result", "done"]
    assert [e["data"] for e in events[:3]] == ["chunk 0\n", "chunk 1\n", "chunk 2\n"]
    assert events[3]["is_main_result"] is False and events[4] == {
        "type": "result",
        "data": {"text/plain": "42"},
        "is_main_result": True,
    }
    done = events[-1]
    assert done["stdout"] == "chunk 0\nchunk 1\nchunk 2\n" and done["text"] == "42" and done["sandbox_lost"] is False
    assert len(done["results"]) == 2


def test_streaming_reports_a_lost_vm_in_the_final_event(client, sandbox_id):
    _, events = stream(client, sandbox_id, LOST_CODE)
    assert events[0] == {"type": "stdout", "data": "about to die\n"}
    assert events[-1]["type"] == "done" and events[-1]["sandbox_lost"] is True
    assert events[-1]["error"]["name"] == "SandboxLost"


def test_streaming_failure_after_headers_ends_with_a_done_error_not_a_traceback(client, sandbox_id, caplog):
    with caplog.at_level(logging.ERROR, logger="appliance.api"):
        result, events = stream(client, sandbox_id, CRASH_CODE)
    assert events[0]["data"] == "partial\n"
    assert events[-1]["type"] == "done" and events[-1]["error"]["name"] == "InternalError"
    assert "Traceback" not in result.text and "Traceback" in caplog.text


def test_streaming_errors_before_the_first_event_are_plain_errors(client, sandbox_id):
    result = client.simulate_post(
        f"/v1/sandboxes/{sandbox_id}/exec", json={"code": BUSY_CODE}, headers={**A, "Accept": "application/x-ndjson"}
    )
    assert_error(result, 409, "sandbox_busy")


def test_client_leaving_a_stream_interrupts_the_code(app, engine, sandbox_id):
    env = falcon.testing.create_environ(
        method="POST",
        path=f"/v1/sandboxes/{sandbox_id}/exec",
        body=json.dumps({"code": CHUNKS_CODE}),
        headers={**A, "Accept": "application/x-ndjson", "Content-Type": "application/json"},
    )
    body = app(env, lambda status, headers: None)
    assert json.loads(next(iter(body)))["type"] == "stdout"
    body.close()  # what the server does when the client disconnects
    assert engine.interrupts == [sandbox_id]


def test_interrupt(client, engine, sandbox_id):
    result = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/interrupt", headers=A)
    assert result.status_code == 202 and result.json == {"id": sandbox_id, "interrupted": True}
    assert engine.interrupts == [sandbox_id]
