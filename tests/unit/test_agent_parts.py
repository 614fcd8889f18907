"""Pieces of the guest agent that are pure logic: output accounting, bundles, status texts, port lookup."""

from __future__ import annotations

import ast
import os
import signal
import sys
from pathlib import Path

import pytest
from appliance_agent import display, pipes, protocol, sysops, worker
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


def test_an_exec_request_to_the_worker_frames_the_code_by_length() -> None:
    code = "s = 'é\\n'\nt = '\ud800'\r\nexec 3\n"
    data = pipes.exec_request(code)
    header, _, body = data.partition(b"\n")
    assert header == b"exec %d" % len(body)
    assert body.decode("utf-8", pipes.CODE_ERRORS) == code


CELLS = [
    "x = 1", "x=1\n", "import os", "from os import path", "a.b = 1", "d[1] = 2", "a, b = 1, 2", "x += 1",
    "x **= 2", "é = 1", "x = await f()", "x = 1 # y = 2", "x <= 1", "x == 1", "x != 1", "x >= 1", "x >>= 1",
    "y", "5", "x = 1\n5", "x = 1; 5", "x = 1; y", "y;", "'s'", 'b"a=1"', 'f"{x=}"', "f(\na=1)", "lambda x=1: x",
    "def f(a=1): pass\nf(\na=2)", 'x = """\n"""', '"""\nx = 1"""', "'a\\\nx = 1'", "x = 1\r5", "# c\nx = 1\n# end",
    "for i in range(3):\n    x = i", "x: int = 1", "(x := 1)", "if x: y = 1", "", "\n\n", "pass",
]  # fmt: skip


@pytest.mark.parametrize("cell", CELLS)
def test_the_worker_finds_a_trailing_expression_as_the_syntax_tree_does(cell: str) -> None:
    tree = ast.parse(cell)
    wanted = bool(tree.body) and isinstance(tree.body[-1], ast.Expr) and not cell.rstrip().endswith(";")
    _body, last = worker.Worker._compile(cell, "<cell-1>")
    assert (last is not None) == wanted


def test_the_fast_compile_path_is_taken_for_plain_statements() -> None:
    # The bytecode check works on this interpreter: module code ends in LOAD_CONST None + RETURN_VALUE on 3.11
    # and in RETURN_CONST None on 3.12, 2 bytes per instruction.
    return_size = {(3, 11): 4, (3, 12): 2}[sys.version_info[:2]]
    assert return_size == worker._RETURN_SIZE
    assert all(worker._surely_no_value(cell) for cell in ("x = 1", "import os", "a.b[0] += 2", "é = 1"))
    assert not any(worker._surely_no_value(cell) for cell in ("x", "x = 1; 5", "x == 1", 'b"a=1"', "x = 1\n5"))
