"""Pieces of the guest agent that are pure logic: output accounting, bundles, status texts, port lookup."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from appliance_agent import display, protocol, sysops
from appliance_agent.output import OutputSink


def test_output_under_the_cap_is_kept_and_merged_per_stream() -> None:
    sink = OutputSink(cap=100)
    sink.feed("stdout", b"a")
    sink.feed("stdout", b"b")
    sink.feed("stderr", b"e")
    sink.feed("stdout", b"c")
    assert sink.take() == [("stdout", "ab"), ("stderr", "e"), ("stdout", "c")]
    assert sink.close() == []
    assert sink.dropped == 0


def test_output_over_the_cap_is_counted_not_kept() -> None:
    sink = OutputSink(cap=5)
    sink.feed("stdout", b"abc")
    sink.feed("stderr", b"defg")
    sink.feed("stdout", b"h" * 1000)
    assert sink.dropped == 2 + 1000
    assert sink.take() == [("stdout", "abc"), ("stderr", "de")]
    assert sink.close() == [("stderr", protocol.TRUNCATION_MARKER.format(omitted=1002))]


def test_a_character_split_across_reads_survives_and_a_cut_one_is_replaced() -> None:
    sink = OutputSink(cap=100)
    sink.feed("stdout", "é".encode()[:1])
    assert sink.take() == []
    sink.feed("stdout", "é".encode()[1:] + b"\xff")
    assert sink.take() == [("stdout", "é\ufffd")]
    cut = OutputSink(cap=1)
    cut.feed("stdout", "é".encode())
    assert cut.close() == [
        ("stdout", "\ufffd"),
        ("stderr", protocol.TRUNCATION_MARKER.format(omitted=1)),
    ]


def test_mime_bundle_prefers_rich_representations_and_survives_broken_ones() -> None:
    class Rich:
        def _repr_html_(self) -> str:
            return "<b>x</b>"

        def _repr_png_(self) -> bytes:
            return b"PNG"

        def _repr_markdown_(self) -> str:
            raise RuntimeError("broken")

        def __repr__(self) -> str:
            return "Rich()"

    assert display.mime_bundle(Rich()) == {"text/plain": "Rich()", "text/html": "<b>x</b>", "image/png": "UE5H"}
    assert display.mime_bundle(Rich) == {"text/plain": repr(Rich)}  # a class: its methods are unbound

    class BadRepr:
        def __repr__(self) -> str:
            raise ValueError("no")

    assert display.mime_bundle(BadRepr())["text/plain"] == "<repr() failed: ValueError: no>"
    long_text = display.plain_text("x" * (display.PLAIN_LIMIT + 10))
    assert long_text.endswith("[12 more characters]")  # 10 x's and the two quotes


def test_status_texts() -> None:
    assert sysops.describe_status(3 << 8) == "exited with code 3"
    assert sysops.describe_status(signal.SIGSEGV) == "was killed by signal SIGSEGV (11)"


def test_virtio_ports_are_found_through_sysfs_without_udev(tmp_path: Path) -> None:
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    ports = [("vport0p1", "org.appliance.agent.0"), ("vport0p2", "org.appliance.agent.1"), ("vport0p3", "other")]
    for port, name in ports:
        (sysfs / port).mkdir(parents=True)
        (sysfs / port / "name").write_text(name + "\n")
    dev.mkdir()
    for port in ("vport0p1", "vport0p3"):  # vport0p2 has no device node (yet)
        (dev / port).touch()
    found = sysops.find_virtio_ports(protocol.AGENT_PORT_PREFIX, sysfs=str(sysfs), dev=str(dev))
    assert found == {"org.appliance.agent.0": str(dev / "vport0p1")}


def test_bytes_available_counts_a_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"12345")
        assert sysops.bytes_available(read_fd) == 5
    finally:
        os.close(read_fd)
        os.close(write_fd)
