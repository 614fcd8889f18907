"""Fleet routing on a node (service/routing.py, service/agent_check.py): sandbox ids that name their node (and old
ids that stay valid), and the agent-check line the balancer weighs creates by: free slots and memory as `ready up N%`,
`drain` while draining or full. The manager's real capacity over a fake engine; the server on a real TCP port."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from service import routing
from service.agent_check import DRAIN_FILE, AgentCheckServer, drain_flag
from service.routing import Capacity, agent_reply
from tests.unit.fakes import KEY_A, fake_manager, key_id, make_config


def test_a_tagged_node_makes_ids_that_name_it_and_untagged_ones_stay_as_before():
    tagged = routing.new_sandbox_id("n2")
    assert re.fullmatch(r"sb-n2-[0-9a-f]{16}", tagged) and routing.node_tag_of(tagged) == "n2"
    plain = routing.new_sandbox_id()
    assert re.fullmatch(r"sb-[0-9a-f]{16}", plain) and routing.node_tag_of(plain) is None
    assert routing.node_tag_of("sb-3f9c0a1b2c3d4e5f") is None  # an id from before tags: valid, no node named
    for made in (tagged, plain, "sb-3f9c0a1b2c3d4e5f"):
        assert re.fullmatch(routing.SANDBOX_ID_PATTERN, made)


@pytest.mark.parametrize("bad", ["sb-N2-0123456789abcdef", "sb-toolongnodetag1-0123456789abcdef",
                                 "sb-n2-0123", "x-n2-0123456789abcdef", "sb-n2-0123456789abcdef/../x"])
def test_malformed_ids_name_no_node(bad: str):
    assert routing.node_tag_of(bad) is None


@pytest.mark.parametrize("tag", ["N2", "a-b", "x" * 13, "é"])
def test_a_tag_outside_the_pattern_is_refused(tag: str):
    with pytest.raises(ValueError):
        routing.new_sandbox_id(tag)


def test_the_manager_gives_new_sandboxes_the_nodes_tag(tmp_path: Path):
    manager, _ = fake_manager(make_config(tmp_path, node_tag="n7"))
    record = manager.create(key_id(manager.config, KEY_A))
    assert routing.node_tag_of(record.id) == "n7"


@pytest.mark.parametrize(("capacity", "reply"), [
    (Capacity(64, 64, 4096.0, 4096.0), "ready up 100%\n"),
    (Capacity(48, 64, 4096.0, 4096.0), "ready up 75%\n"),  # slots are the scarcer
    (Capacity(60, 64, 1024.0, 4096.0), "ready up 25%\n"),  # memory is the scarcer
    (Capacity(60, 64, 1.0, 4096.0), "ready up 1%\n"),  # a node with any room still gets some creates
    (Capacity(0, 64, 4096.0, 4096.0), "drain\n"),  # no slot left
    (Capacity(10, 64, -512.0, 4096.0), "drain\n"),  # memory overcommitted already
    (Capacity(10, 64), "ready up 16%\n"),  # host memory unknown: slots alone
])
def test_the_weight_is_the_scarcer_of_free_slots_and_free_memory(capacity: Capacity, reply: str):
    assert agent_reply(capacity, draining=False) == reply


def test_a_draining_node_takes_no_creates_whatever_its_room():
    assert agent_reply(Capacity(64, 64, 4096.0, 4096.0), draining=True) == "drain\n"


def test_the_managers_capacity_falls_as_sandboxes_start(tmp_path: Path):
    manager, _ = fake_manager(make_config(tmp_path, max_sandboxes=4, max_sandboxes_per_key=4))
    before = manager.free_capacity()
    assert (before.slots_free, before.slots_total) == (4, 4)
    manager.create(key_id(manager.config, KEY_A))
    after = manager.free_capacity()
    assert after.slots_free == 3
    assert after.memory_free_mib is not None and before.memory_free_mib is not None
    assert after.memory_free_mib < before.memory_free_mib


def _ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        data = b""
        while chunk := conn.recv(100):
            data += chunk
        return data.decode()


def test_the_agent_check_port_answers_haproxys_one_line(tmp_path: Path):
    manager, _ = fake_manager(make_config(tmp_path, max_sandboxes=4, max_sandboxes_per_key=4))
    server = AgentCheckServer("127.0.0.1", 0, manager.free_capacity, drain_flag(tmp_path)).start()
    try:
        assert re.fullmatch(r"ready up \d+%\n", _ask(server.port))
        (tmp_path / DRAIN_FILE).touch()  # what the upgrade does first
        assert _ask(server.port) == "drain\n"
    finally:
        server.close()


def test_a_capacity_that_cannot_be_read_answers_drain(tmp_path: Path):
    def broken() -> Capacity:
        raise OSError("registry unreadable")

    server = AgentCheckServer("127.0.0.1", 0, broken, lambda: False).start()
    try:
        assert _ask(server.port) == "drain\n"
    finally:
        server.close()
