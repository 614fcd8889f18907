"""The SDK against the real API app and manager (a fake engine underneath), in-process through httpx's WSGI
transport."""

from __future__ import annotations

import hashlib
import io
from dataclasses import replace

import httpx
import pytest

from appliance.client import (
    AuthenticationError,
    InsufficientCapacityError,
    InsufficientStorageError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    RateLimitError,
    Sandbox,
    SandboxBusyError,
)
from appliance.client.tools import OPENAI_TOOL, run_tool_call
from service.api import create_app

from .fakes import BUSY_CODE, CHUNKS_CODE, HOST, KEY_A, KEY_B, KEY_METRICS, states


@pytest.fixture
def service_overrides() -> dict:
    return {"max_file_bytes": 16 << 20, "max_sandboxes_per_key": 2}


@pytest.fixture
def connect(manager, monkeypatch):
    monkeypatch.delenv("APPLIANCE_URL", raising=False)
    monkeypatch.setenv("APPLIANCE_API_KEY", KEY_A)
    app = create_app(manager.config, manager)

    def make(**kwargs) -> Sandbox:
        http = httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://appliance.test")
        return Sandbox(http_client=http, **kwargs)

    return make


def test_run_code_keeps_state_and_context_manager_deletes(connect, manager):
    with connect(metadata={"who": "test"}) as sb:
        assert sb.id in states(manager) and sb.info["metadata"] == {"who": "test"}
        assert sb.run_code("x = 41").text is None
        result = sb.run_code("print('hello'); x + 1")
        assert (result.text, result.stdout, result.error, result.ok) == ("42", "hello\n", None, True)
        failed = sb.run_code("1/0")
        assert failed.error.name == "ZeroDivisionError" and not failed.ok
    assert sb.id not in states(manager)


def test_streaming_yields_events_then_the_execution(connect):
    with connect() as sb:
        stream = sb.run_code(CHUNKS_CODE, stream=True)
        events = list(stream)
        assert [e["type"] for e in events] == ["stdout", "stdout", "stdout", "result", "result", "done"]
        assert stream.execution.text == "42" and len(stream.execution.results) == 2


def test_files_bytes_file_objects_and_iterables(connect, manager):
    with connect() as sb:
        data = bytes(range(256)) * 4096  # 1 MiB
        assert sb.files.write("/d/a.bin", data)["sha256"] == hashlib.sha256(data).hexdigest()
        info = sb.files.write("/d/b.bin", io.BytesIO(data))  # Content-Length from the file's size
        assert info["size"] == len(data)
        info = sb.files.write("/d/c.bin", iter([b"abc", b"def"]))  # chunked, no length
        assert info == {"path": "/d/c.bin", "size": 6, "sha256": hashlib.sha256(b"abcdef").hexdigest()}
        assert sb.files.read("/d/a.bin") == data
        assert b"".join(sb.files.read_stream("/d/c.bin", chunk_size=2)) == b"abcdef"
        assert [e["name"] for e in sb.files.list("/d")] == ["a.bin", "b.bin", "c.bin"]
        assert [e["name"] for e in sb.files.iter("/d", page_size=1)] == ["a.bin", "b.bin", "c.bin"]  # 3 pages
        first = sb.files.list_page("/d", limit=2)
        assert [e["name"] for e in first["entries"]] == ["a.bin", "b.bin"] and first["more"]
        assert [e["name"] for e in sb.files.list_page("/d", first["cursor"])["entries"]] == ["c.bin"]
        with pytest.raises(NotFoundError):
            sb.files.read("/d/missing")


def test_connect_and_errors_carry_the_api_code(connect, manager, monkeypatch):
    sb = connect()
    again = connect(sandbox_id=sb.id)
    assert again.run_code("1 + 1").text == "2"
    with pytest.raises(SandboxBusyError) as busy:
        sb.run_code(BUSY_CODE)
    assert busy.value.code == "sandbox_busy" and busy.value.status == 409
    with pytest.raises(InvalidRequestError) as invalid:
        sb.run_code("1", timeout=-1)
    assert invalid.value.field == "timeout_s"
    connect()
    with pytest.raises(RateLimitError) as limited:
        connect()
    assert limited.value.retry_after and limited.value.retry_after > 0
    monkeypatch.setenv("APPLIANCE_API_KEY", KEY_B)
    with pytest.raises(NotFoundError):
        connect(sandbox_id=sb.id)
    monkeypatch.setenv("APPLIANCE_API_KEY", "wrong")
    with pytest.raises(AuthenticationError):
        connect()
    monkeypatch.setenv("APPLIANCE_API_KEY", KEY_METRICS)  # a metrics key may not make sandboxes
    with pytest.raises(PermissionDeniedError) as denied:
        connect()
    assert denied.value.code == "forbidden" and denied.value.status == 403


def test_create_waits_while_the_service_warms_up(connect, manager, engine, monkeypatch):
    engine.unpublish_template(manager.templates)  # the pool keeper is still warming its template
    # While the SDK waits to retry, the keeper publishes it.
    monkeypatch.setattr("appliance.client.sandbox.time.sleep", lambda s: engine.publish_template(manager.templates))
    assert connect().id in states(manager)
    engine.unpublish_template(manager.templates)
    with pytest.raises(NotReadyError):
        connect(ready_timeout=0)


def test_tool_call_through_the_sdk(connect):
    with connect() as sb:
        call = {
            "id": "c1",
            "type": "function",
            "function": {"name": OPENAI_TOOL["function"]["name"], "arguments": '{"code": "print(6 * 7)"}'},
        }
        assert run_tool_call(call, sb) == "[stdout]\n42"


def test_fork_returns_independent_sandboxes_and_the_source_is_unchanged(connect, manager):
    manager.config = replace(manager.config, max_sandboxes_per_key=4)
    with connect() as sb:
        sb.run_code("x = [41]")
        kids = sb.fork(2)
        assert [type(k) for k in kids] == [Sandbox, Sandbox] and len({sb.id, *(k.id for k in kids)}) == 3
        assert all(k.info["metadata"]["forked_from"] == sb.id and k.state == "running" for k in kids)
        for i, kid in enumerate(kids):
            kid.run_code(f"x.append({i})")
        assert [k.run_code("x").text for k in kids] == ["[41, 0]", "[41, 1]"]
        assert sb.run_code("x").text == "[41]"
        grandkid = kids[0].fork()[0]
        assert grandkid.run_code("x").text == "[41, 0]"
        for kid in (*kids, grandkid):
            kid.close()
    assert states(manager) == {}


def test_fork_errors_are_typed(connect, manager):
    with connect() as sb:
        with pytest.raises(RateLimitError) as limited:
            sb.fork(2)  # 1 + 2 > 2 per key
        assert limited.value.retry_after > 0
        with pytest.raises(InvalidRequestError) as invalid:
            sb.fork(0)
        assert invalid.value.field == "n"
        manager.config = replace(manager.config, max_sandboxes_per_key=3)
        manager.host_meminfo = lambda: HOST | {"MemAvailable": 2 << 30}  # no room above the host's reserve
        with pytest.raises(InsufficientCapacityError) as short:
            sb.fork(1)
        assert short.value.status == 507 and short.value.code == "insufficient_capacity"
        assert isinstance(short.value, InsufficientStorageError)  # what older callers catch
        assert list(states(manager)) == [sb.id]


def test_copies_keep_working_after_the_source_is_closed(manager, monkeypatch):
    # Without a client passed in, each sandbox (a copy too) owns its connection: closing one closes only its own.
    monkeypatch.setenv("APPLIANCE_API_KEY", KEY_A)
    app = create_app(manager.config, manager)
    real_client = httpx.Client
    made: list[httpx.Client] = []

    def client(**kwargs) -> httpx.Client:
        made.append(real_client(transport=httpx.WSGITransport(app=app), **kwargs))
        return made[-1]

    monkeypatch.setattr(httpx, "Client", client)
    sb = Sandbox(url="http://appliance.test")
    sb.run_code("x = 1")
    (kid,) = sb.fork(1)
    sb.close()
    assert kid.run_code("x + 1").text == "2"
    assert len(made) == 2 and made[0].is_closed and not made[1].is_closed
    kid.close()
    assert made[1].is_closed


def test_persistent_sandbox_freeze_connect_and_transparent_resume(connect, manager):
    sb = connect(persistent=True, idle_freeze_s=300)
    record = manager.registry.get(sb.id)
    assert record.persistent is True and record.timeout_s == 300
    assert sb.info["persistent"] is True
    sb.run_code("x = 41")
    assert sb.freeze()["state"] == "frozen" and sb.state == "frozen"
    assert [s["id"] for s in Sandbox.list(state="frozen", http_client=sb._api.http)] == [sb.id]
    again = connect(sandbox_id=sb.id)
    assert again.state == "frozen"
    assert again.run_code("x + 1").text == "42"  # the call resumes it
    assert again.refresh()["state"] == "running"
    again.freeze()
    assert again.resume()["state"] == "running" and again.state == "running"
    assert Sandbox.list(state="frozen", http_client=sb._api.http) == []
    with pytest.raises(InvalidRequestError) as invalid:
        Sandbox.list(state="asleep", http_client=sb._api.http)
    assert invalid.value.field == "state"


def test_idle_freeze_needs_persistent():
    with pytest.raises(ValueError, match="persistent=True"):
        Sandbox(api_key="k", idle_freeze_s=60)
    with pytest.raises(ValueError, match="not both"):
        Sandbox(api_key="k", persistent=True, idle_freeze_s=60, timeout_s=30)


def test_a_request_on_a_connection_the_server_just_closed_is_sent_again(monkeypatch):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 2:  # the first exec hits a kept-alive connection of a worker that was just recycled
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if request.method == "POST" and request.url.path == "/v1/sandboxes":
            return httpx.Response(201, json={"id": "sb-1"})
        return httpx.Response(200, json={"stdout": "", "stderr": "", "results": [], "text": "2", "error": None})

    http = httpx.Client(transport=httpx.MockTransport(handler), base_url="http://appliance.test")
    sb = Sandbox(http_client=http, api_key="k")
    assert sb.run_code("1 + 1").text == "2"
    assert calls == ["/v1/sandboxes", "/v1/sandboxes/sb-1/exec", "/v1/sandboxes/sb-1/exec"]


def test_network_shorthands_become_the_apis_policy():
    from appliance.client.sandbox import network_policy

    assert network_policy(None) is None
    assert network_policy("all") == {"egress": "all"}
    assert network_policy(["10.1.2.0/24", "db:5432"]) == {"egress": {"allow": ["10.1.2.0/24", "db:5432"]}}
    assert network_policy({"egress": "none"}) == {"egress": "none"}


def test_named_snapshots_through_the_sdk(connect):
    from appliance.client import SnapshotExistsError

    with connect() as source:
        source.run_code("x = 41")
        saved = source.snapshots.create("base")
        assert saved["name"] == "base" and saved["state"] == "ready" and saved["source_sandbox_id"] == source.id
        with pytest.raises(SnapshotExistsError):
            source.snapshots.create("base")
        assert [s["name"] for s in source.snapshots.list()] == ["base"]
        assert source.snapshots.get("base")["memory_mib"] == source.info["memory_mib"]
    made = connect(snapshot="base")
    assert made.info["metadata"] == {"from_snapshot": "base"} and made.run_code("x + 1").text == "42"
    made.snapshots.delete("base")
    with pytest.raises(NotFoundError):
        made.snapshots.get("base")
    with pytest.raises(NotFoundError):
        connect(snapshot="base")
    made.close()
