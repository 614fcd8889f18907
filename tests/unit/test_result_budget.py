"""The host's budget on what one exec returns: whatever the guest sends, the host holds and forwards a bounded
amount, says so once, and counts what it dropped."""

from __future__ import annotations

import pytest
from appliance_agent import protocol

from service.engine.result_budget import HOST_MARKER, ResultBudget


def done(**fields) -> dict:
    return {"id": 1, "ev": "done", "value": None, "error": None, "truncated_bytes": 0} | fields


def test_displays_and_streams_share_one_budget_and_the_rest_is_counted():
    budget = ResultBudget(1000)
    kept = []
    for _ in range(8):  # eight displays of 400 bytes: the agent's own output cap does not count these
        kept += budget.admit({"id": 1, "ev": "display", "data": {"text/html": "x" * 380}})
    kept += budget.admit({"id": 1, "ev": "stdout", "data": "y" * 100})
    final = budget.admit(done(truncated_bytes=5))[0]
    displays = [e for e in kept if e["ev"] == "display"]
    markers = [e for e in kept if e["ev"] == "stderr"]
    assert len(displays) == 2 and budget.used <= 1000
    assert len(markers) == 1 and markers[0]["data"] == HOST_MARKER.format(budget=1000)
    assert final["truncated_bytes"] == 5 + budget.dropped and budget.dropped > 6 * 380


def test_an_oversized_value_is_replaced_and_counted():
    budget = ResultBudget(100)
    final = budget.admit(done(value={"text/plain": "v" * 500}))[0]
    assert "went over" in final["value"]["text/plain"] and final["truncated_bytes"] > 500


def test_a_flood_of_tiny_events_is_bounded_by_count():
    budget = ResultBudget(1 << 30, max_events=50)
    kept = [e for _ in range(1000) for e in budget.admit({"id": 1, "ev": "stdout", "data": "."})]
    assert len(kept) == 51 and kept[-1]["ev"] == "stderr"  # 50 events, then the one marker
    assert budget.admit(done())[0]["truncated_bytes"] == 1000 - 50


def test_within_budget_nothing_changes():
    budget = ResultBudget(1000)
    events = [{"id": 1, "ev": "stdout", "data": "hi\n"}, {"id": 1, "ev": "display", "data": {"text/plain": "1"}}]
    assert [e for event in events for e in budget.admit(event)] == events
    assert budget.admit(done(value={"text/plain": "2"})) == [done(value={"text/plain": "2"})]


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"id": 1, "ev": "done", "value": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_a_message_nested_too_deeply_is_a_protocol_error_not_a_crash(line):
    with pytest.raises(protocol.ProtocolError, match="nested"):
        protocol.decode(line)
