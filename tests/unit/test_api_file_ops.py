"""The host side of the file ops: guest errors mapped to statuses, guest replies held to their documented shape,
the watch stream's rules (an injected clock and poll), and the routes' own validation (against the FakeEngine)."""

from __future__ import annotations

import json

import falcon
import falcon.testing
import pytest

from service import file_entries, file_watch
from service.api.file_ops import Watch
from service.errors import Busy, LimitReached, SandboxLostError

from .api_helpers import A, assert_error


@pytest.mark.parametrize(("code", "status", "stable"), [
    ("not_found", 404, "not_found"), ("already_exists", 409, "already_exists"), ("not_empty", 409, "not_empty"),
    ("not_a_directory", 422, "invalid"), ("is_a_directory", 422, "invalid"), ("permission_denied", 422, "invalid"),
    ("invalid_path", 422, "invalid"), ("limit_reached", 429, "limit_reached"), ("no_space", 507,
                                                                                "insufficient_storage"),
    ("io_error", 500, "internal"), (["hostile"], 500, "internal"),
])
def test_guest_error_codes_map_to_documented_statuses(code, status, stable):
    error = file_entries.error_for(code, "/data/x: what happened")
    assert (error.status, error.code) == (status, stable) and "/data/x" in error.message


def test_guest_replies_are_held_to_their_shape():
    hostile = {"name": "n" * 10_000, "path": 7, "type": "socket!", "size": "big", "mtime": True, "mode": 420,
               "target": "/etc", "extra": "x" * 100}
    info = file_entries.stat_reply(hostile)
    assert set(info) == {"name", "path", "type", "size", "mtime", "mode"}  # a target only for a link
    assert len(info["name"]) == file_entries.MAX_PATH_CHARS and info["path"] == "" and info["type"] == "other"
    assert (info["size"], info["mtime"], info["mode"]) == (0, 0, 420)
    assert file_entries.stat_reply({"type": "link", "target": "/etc/shadow"})["target"] == "/etc/shadow"
    assert file_entries.watch_event({"type": "chmod", "path": "/a"}) is None
    assert file_entries.watch_event({"type": "create", "path": ""}) is None
    assert file_entries.watch_event({"type": "create", "path": "/a", "is_dir": "yes"}) == {
        "type": "create", "path": "/a", "is_dir": False}


class _Guest:
    """Replies to watch_poll from a script; records every call."""

    def __init__(self, replies: list) -> None:
        self.replies = replies
        self.calls: list[str] = []

    def __call__(self, op: str, **args) -> dict:
        self.calls.append(op)
        if op == "watch_stop":
            return {}
        reply = self.replies.pop(0) if self.replies else {"events": []}
        if isinstance(reply, Exception):
            raise reply
        return reply


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)


def _run(guest: _Guest, duration: float) -> list[dict]:
    clock = _Clock()
    return list(file_watch.stream(guest, "w1", duration, clock, clock.sleep))


def test_the_stream_passes_events_skips_a_busy_poll_and_ends_at_its_deadline():
    create = {"type": "create", "path": "/d/a", "is_dir": False}
    guest = _Guest([{"events": [create, {"type": "bogus"}], "overflow": True}, Busy("exec running"),
                    {"events": [create]}])
    events = _run(guest, 2.0)
    assert events == [{"type": "overflow"}, create, create, {"type": "end", "reason": "timeout"}]
    assert guest.calls[-1] == "watch_stop" and guest.calls.count("watch_poll") > 3


def test_a_quiet_stream_pings_so_a_gone_client_is_noticed():
    events = _run(_Guest([]), file_watch.PING_S * 3.5)
    assert [e["type"] for e in events].count("ping") == 3 and events[-1]["type"] == "end"


def test_the_stream_ends_when_the_directory_or_the_sandbox_goes():
    guest = _Guest([{"events": [{"type": "delete", "path": "/d", "is_dir": True}], "ended": True}])
    assert _run(guest, 60)[-1] == {"type": "end", "reason": "deleted"}
    assert "watch_stop" not in guest.calls  # the guest dropped it already
    lost = _Guest([SandboxLostError("gone")])
    assert _run(lost, 60) == [{"type": "end", "reason": "sandbox_lost"}]


def test_the_stream_asks_again_at_once_while_the_guest_has_more_and_bounds_a_reply():
    many = [{"type": "modify", "path": f"/d/{i}", "is_dir": False} for i in range(2000)]
    clock = _Clock()
    guest = _Guest([{"events": many, "more": True}, {"events": many[:1]}])
    events = list(file_watch.stream(guest, "w1", 0.001, clock, clock.sleep))
    # the first reply was cut to the guest's own bound; the second poll came before any sleep
    assert len(events) == file_watch.MAX_REPLY_EVENTS + 1 + 1


def test_closing_the_stream_stops_the_guest_watch():
    guest = _Guest([{"events": [{"type": "create", "path": "/d/a", "is_dir": False}]}])
    clock = _Clock()
    stream = file_watch.stream(guest, "w1", 60, clock, clock.sleep)
    next(stream)
    stream.close()  # the client went away
    assert guest.calls[-1] == "watch_stop"


def test_new_routes_validate_their_input_and_name_the_field(client, sandbox_id):
    files = f"/v1/sandboxes/{sandbox_id}/files"
    for depth in ("0", "33", "two"):
        error = assert_error(client.simulate_get(f"{files}/list", params={"path": "/d", "depth": depth}, headers=A),
                             422, "invalid")
        assert error["field"] == "depth"
    # a recursive listing's cursor is a relative path; a flat one's is a name
    assert client.simulate_get(f"{files}/list", params={"path": "/d", "depth": "3", "cursor": "a/b"},
                               headers=A).status_code == 200
    assert_error(client.simulate_get(f"{files}/list", params={"path": "/d", "cursor": "a/b"}, headers=A),
                 422, "invalid")
    assert assert_error(client.simulate_delete(files, params={"path": "/d", "recursive": "yes"}, headers=A),
                        422, "invalid")["field"] == "recursive"
    assert client.simulate_delete(files, params={"path": "/d"}, headers=A).status_code == 204
    for body, field in (({"path": ""}, "path"), ({"path": "a\x00"}, "path"), ({"path": "/a", "parents": "yes"},
                                                                                 "parents"), ({}, "path")):
        assert assert_error(client.simulate_post(f"{files}/mkdir", json=body, headers=A), 422,
                            "invalid")["field"] == field
    made = client.simulate_post(f"{files}/mkdir", json={"path": "/a"}, headers=A)
    assert made.status_code == 201 or made.status_code == 200
    assert assert_error(client.simulate_post(f"{files}/rename", json={"path": "/a"}, headers=A), 422,
                        "invalid")["field"] == "to"
    assert assert_error(client.simulate_post(f"{files}/rename", json={"path": "/a", "to": "/b", "x": 1},
                                             headers=A), 422, "invalid")["field"] == "x"
    assert client.simulate_post(f"{files}/rename", json={"path": "/a", "to": "/b"}, headers=A).json == {"path": "/b"}
    for timeout in ("0", "3601", "soon", "nan"):
        assert assert_error(client.simulate_get(f"{files}/watch", params={"path": "/d", "timeout_s": timeout},
                                                headers=A), 422, "invalid")["field"] == "timeout_s"
    assert_error(client.simulate_get(f"{files}/stat", headers=A), 422, "invalid")
    assert_error(client.simulate_get("/v1/sandboxes/sb-00000000/files/stat", params={"path": "/a"}, headers=A),
                 404, "not_found")


def test_watch_streams_per_process_are_bounded_and_a_closed_stream_frees_its_slot(manager, sandbox_id):
    owner = manager.registry.get(sandbox_id).owner
    watch = Watch(manager, max_streams=1)
    environ = falcon.testing.create_environ(query_string="path=/d&timeout_s=0.05")

    def open_stream() -> falcon.Response:
        req, resp = falcon.Request(environ), falcon.Response()
        req.context.owner = owner
        watch.on_get(req, resp, sandbox_id)
        return resp

    first = open_stream()
    with pytest.raises(LimitReached):
        open_stream()
    lines = [json.loads(line) for line in first.stream]
    assert lines[-1] == {"type": "end", "reason": "timeout"}
    with pytest.raises(LimitReached):  # the body was sent, but only the server's close() ends the response
        open_stream()
    first.stream.close()
    unread = open_stream()  # the slot is free again
    unread.stream.close()  # closed before a line was read (the client went at once): freed all the same
    open_stream().stream.close()
