"""The E2B-compatible surface's pure parts: access tokens, the record → E2B sandbox shape, exec events → /execute
lines (tests/integration/test_e2b.py drives the real SDKs against a live service)."""

from __future__ import annotations

from service.compat.e2b.translate import (
    access_token,
    execute_lines,
    result_fields,
    sandbox_info,
    token_key_id,
)
from service.registry import FROZEN, RUNNING, SandboxRecord

SECRET = b"s" * 32


def record(state: str = RUNNING) -> SandboxRecord:
    return SandboxRecord(id="sb-0123abcd", owner="key_aaaaaaaaaaaa", state=state, vm_dir="/x", template_id="tpl",
                         machine={"vcpus": 2, "memory_mib": 1024}, timeout_s=60.0, metadata={"user": 7},
                         created_at=1_700_000_000.0, last_active_at=1_700_000_100.0)


def test_an_access_token_opens_its_own_sandbox_only():
    token = access_token(SECRET, "sb-0123abcd", "key_aaaaaaaaaaaa")
    assert token_key_id(SECRET, "sb-0123abcd", token) == "key_aaaaaaaaaaaa"
    assert token_key_id(SECRET, "sb-0123abce", token) is None  # another sandbox
    assert token_key_id(b"t" * 32, "sb-0123abcd", token) is None  # another deployment
    _, _, mac = token.partition(".")
    assert token_key_id(SECRET, "sb-0123abcd", f"key_bbbbbbbbbbbb.{mac}") is None  # another key's id, same MAC
    assert token_key_id(SECRET, "sb-0123abcd", token[:-1]) is None
    assert token_key_id(SECRET, "sb-0123abcd", "") is None
    assert token_key_id(SECRET, "sb-0123abcd", "x" * 10_000) is None


def test_a_record_in_e2b_shape():
    info = sandbox_info(record())
    assert info["sandboxID"] == "sb-0123abcd" and info["state"] == "running"
    assert info["startedAt"] == "2023-11-14T22:13:20.000Z"
    assert info["endAt"] == "2023-11-14T22:16:00.000Z"  # last use + idle period
    assert (info["cpuCount"], info["memoryMB"]) == (2, 1024)
    assert info["metadata"] == {"user": "7"}  # E2B metadata is strings
    assert sandbox_info(record(FROZEN))["state"] == "paused"


def test_exec_events_become_execute_lines():
    assert execute_lines({"ev": "stdout", "data": "hi\n"}, now_ns=5) == [
        {"type": "stdout", "text": "hi\n", "timestamp": 5}]
    assert execute_lines({"ev": "display", "data": {"text/html": "<b>", "text/plain": "b"}}) == [
        {"type": "result", "html": "<b>", "text": "b", "is_main_result": False}]
    done = execute_lines({"ev": "done", "value": {"text/plain": "42"},
                          "error": {"name": "ZeroDivisionError", "value": "division by zero",
                                    "traceback": ["Traceback\n", "  line 1\n"]}})
    assert done == [{"type": "result", "text": "42", "is_main_result": True},
                    {"type": "error", "name": "ZeroDivisionError", "value": "division by zero",
                     "traceback": "Traceback\n  line 1\n"}]
    assert execute_lines({"ev": "done"}) == []
    assert execute_lines({"ev": "progress"}) == []


def test_unknown_mime_types_travel_in_extra():
    assert result_fields({"image/png": "iVBOR", "application/vnd.custom": {"a": 1}}) == {
        "png": "iVBOR", "extra": {"application/vnd.custom": {"a": 1}}}
