"""Binary frames on the line protocol, and the agent's file operations (run here against a temp dir)."""

from __future__ import annotations

import os

import pytest
from appliance_agent import files, frames, protocol


def test_payload_frames_survive_any_chunking():
    payload = bytes(range(256)) * 40 + b"\n\n{not json}\n"
    stream = (
        frames.encode({"id": 1, "ev": "ok"})
        + frames.encode({"id": 2, "ev": "ok", "size": 9}, payload)
        + frames.encode({"id": 3, "ev": "pong"})
    )
    for step in (1, 7, 4096, len(stream)):
        reader = frames.FrameReader()
        messages = []
        for i in range(0, len(stream), step):
            messages += reader.feed(stream[i : i + step])
        assert [m["id"] for m in messages] == [1, 2, 3]
        assert messages[1][frames.PAYLOAD_KEY] == payload and messages[1]["length"] == len(payload)
        assert frames.PAYLOAD_KEY not in messages[0]


def test_oversized_payload_is_a_protocol_error():
    with pytest.raises(protocol.ProtocolError):
        frames.FrameReader().feed(protocol.encode({"id": 1, "ev": "ok", "length": frames.MAX_PAYLOAD + 1}))


def test_write_append_read_and_list(tmp_path):
    target = str(tmp_path / "sub" / "data.bin")
    assert files.file_write({"path": target, frames.PAYLOAD_KEY: b"hello "})[0] == {"size": 6}
    assert files.file_write({"path": target, "append": True, frames.PAYLOAD_KEY: b"world"})[0] == {"size": 11}
    reply, data = files.file_read({"path": target, "offset": 0, "max": 5})
    assert data == b"hello" and reply == {"size": 11, "eof": False}
    reply, data = files.file_read({"path": target, "offset": 5, "max": 100})
    assert data == b" world" and reply["eof"]
    entries = files.list_dir({"path": str(tmp_path / "sub")})[0]["entries"]
    assert [(e["name"], e["type"], e["size"]) for e in entries] == [("data.bin", "file", 11)]


def test_a_listing_comes_in_pages_in_name_order(tmp_path):
    for i in range(25):
        (tmp_path / f"n{i:03d}").write_bytes(b"x" * i)
    (tmp_path / "dir").mkdir()
    names, after, pages = [], None, 0
    for _ in range(10):  # a cursor that does not advance would loop: 10 pages is far past 3
        reply = files.list_dir({"path": str(tmp_path), "limit": 10, **({} if after is None else {"after": after})})[0]
        assert len(reply["entries"]) <= 10
        names += [entry["name"] for entry in reply["entries"]]
        pages += 1
        if not reply["more"]:
            assert reply["after"] is None
            break
        after = reply["after"]
        if pages == 1:
            (tmp_path / "zz-added-between-pages").write_bytes(b"")  # the next page sees it
    assert names == ["dir", *(f"n{i:03d}" for i in range(25)), "zz-added-between-pages"] and pages == 3
    assert files.list_dir({"path": str(tmp_path)})[0]["more"] is False  # the default page holds them all
    for bad in ({"limit": 0}, {"limit": files.MAX_PAGE + 1}, {"limit": "5"}, {"limit": True}, {"after": 5}):
        with pytest.raises(files.FileOpError, match=r"limit|after"):
            files.list_dir({"path": str(tmp_path), **bad})


@pytest.mark.parametrize(
    ("op", "message", "code"),
    [
        ("file_read", {"path": "missing.txt"}, "not_found"),
        ("file_read", {"path": "."}, "is_a_directory"),
        ("list_dir", {"path": "missing-dir"}, "not_found"),
        ("file_write", {"path": ""}, "io_error"),
    ],
)
def test_failures_have_stable_codes(tmp_path, monkeypatch, op, message, code):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(files.FileOpError) as err:
        files.HANDLERS[op](message)
    assert err.value.code == code and err.value.code in frames.FILE_ERRORS


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files.file_write({"path": "in.csv", frames.PAYLOAD_KEY: b"a,b\n"})
    assert (tmp_path / "in.csv").read_bytes() == b"a,b\n"
    assert os.path.exists("in.csv")
