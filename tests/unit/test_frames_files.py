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
