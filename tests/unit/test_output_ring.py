"""The bounded output ring of a command (image-builder/guest/agent/appliance_agent/ring.py)."""

from __future__ import annotations

from appliance_agent.ring import OutputRing


def test_reads_from_any_offset_keep_stream_order() -> None:
    ring = OutputRing(100)
    ring.append("stdout", b"abc")
    ring.append("stderr", b"DE")
    ring.append("stdout", b"f")
    assert ring.read(0, 100) == ([("stdout", "abc"), ("stderr", "DE"), ("stdout", "f")], 0, 6, 0)
    assert ring.read(2, 100) == ([("stdout", "c"), ("stderr", "DE"), ("stdout", "f")], 2, 6, 0)
    assert ring.read(1, 3) == ([("stdout", "bc"), ("stderr", "D")], 1, 4, 0)
    assert ring.read(99, 10) == ([], 6, 6, 0)


def test_a_full_ring_drops_the_oldest_bytes_and_says_how_many() -> None:
    ring = OutputRing(4)
    ring.append("stdout", b"abc")
    ring.append("stderr", b"def")
    assert (ring.start, ring.end, ring.dropped) == (2, 6, 2)
    assert ring.read(0, 10) == ([("stdout", "c"), ("stderr", "def")], 2, 6, 2)
    ring.append("stdout", b"0123456789")  # larger than the ring: only its tail stays
    assert ring.read(0, 10) == ([("stdout", "6789")], 12, 16, 12)
    assert ring.dropped == 12
