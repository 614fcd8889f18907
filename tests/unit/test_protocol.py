"""The host <-> agent wire protocol (appliance_agent.protocol): framing and message shapes."""

from __future__ import annotations

import json

import pytest
from appliance_agent import protocol


def test_a_message_is_one_line_even_with_newlines_in_strings() -> None:
    line = protocol.encode(protocol.request(3, "exec", code="print('a')\nprint('b')", language="python"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode(line) == {"id": 3, "op": "exec", "code": "print('a')\nprint('b')", "language": "python"}


def test_encoding_is_compact_utf8() -> None:
    line = protocol.encode(protocol.event(1, "stdout", data="é"))
    assert line == '{"id":1,"ev":"stdout","data":"é"}\n'.encode()


@pytest.mark.parametrize(
    "line",
    [b"not json", b"[1, 2]", b'"text"', b'{"op": "ping"}', b'{"id": "1", "op": "ping"}', b'{"id": 1}', b""],
)
def test_decode_rejects_what_is_not_a_message(line: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(line)


def test_decode_tolerates_invalid_utf8_inside_strings() -> None:
    message = protocol.decode(b'{"id": 1, "op": "exec", "code": "\xff"}')
    assert message["code"] == "\ufffd"


def test_unknown_ops_and_events_are_refused_when_building() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.request(1, "format_disk")
    with pytest.raises(protocol.ProtocolError):
        protocol.event(1, "surprise")
    assert {"ping", "exec", "interrupt", "reseed", "set_clock", "restart_worker"} <= protocol.OPS
    assert {"hello", "pong", "stdout", "stderr", "display", "done", "ok", "error"} == protocol.EVENTS


def test_text_replaces_invalid_utf8() -> None:
    assert protocol.text(b"ok\xff\xfe") == "ok\ufffd\ufffd"


def test_line_reader_reassembles_split_lines_and_skips_empty_ones() -> None:
    reader = protocol.LineReader()
    assert reader.feed(b'{"id":1,') == []
    assert reader.feed(b'"op":"ping"}\n\n{"id":2,"op"') == [b'{"id":1,"op":"ping"}']
    assert reader.feed(b':"ping"}\n') == [b'{"id":2,"op":"ping"}']
    assert [json.loads(line)["id"] for line in reader.feed(b'{"id":3}\n{"id":4}\n')] == [3, 4]
    assert reader.feed(b"a\n\nb\n") == [b"a", b"b"]
    assert reader.feed(b"c") == []
    assert reader.feed(b"\n") == [b"c"]


def test_line_reader_refuses_an_endless_line() -> None:
    reader = protocol.LineReader(max_line=10)
    with pytest.raises(protocol.ProtocolError):
        reader.feed(b"x" * 11)


def test_truncation_marker_names_the_count() -> None:
    assert protocol.TRUNCATION_MARKER.format(omitted=1234) == "\n[output truncated: 1234 bytes omitted]\n"


def test_port_names() -> None:
    assert protocol.agent_port_name(0) == protocol.AGENT_PORT_NAME
    assert protocol.agent_port_name(3).startswith(protocol.AGENT_PORT_PREFIX)


@pytest.mark.parametrize("duration", [0.0, 0.000123, 1.5, 12345.678901, 1e-06])
def test_the_quiet_done_line_is_the_encoded_event(duration: float) -> None:
    expected = protocol.encode(
        protocol.event(
            17, "done", value=None, error=None, exit_code=None, truncated_bytes=0,
            worker_restarted=False, worker_exit=None, duration_s=duration,
        )
    )  # fmt: skip
    assert protocol.encode_quiet_done(17, duration) == expected
