"""A clock jump, with an injected clock (never the machine's): the real pool keeper's reaper, the real manager and
registry over the fake engine. A running sandbox (x = 41), a frozen one (x = 41) and a create in flight (its place
reserved, as a worker holds it while it clones) must survive a jump of the wall clock a day forward or back; only
time the keeper itself watched pass (its monotonic clock) closes an idle sandbox or gives back a place."""

from __future__ import annotations

import time

import pytest

from service.manager import SandboxManager, new_sandbox_id
from service.pool import _RESERVATION_LIFETIME_S, PoolKeeper
from service.registry import CREATING, FROZEN, RUNNING, TOUCH_EVERY_S, SandboxRecord

from .fakes import FakeEngine

OWNER = "owner-hash"
DAY = 86400.0
LIFETIME_S = 600.0


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scene(manager: SandboxManager, engine: FakeEngine):
    running = manager.create(OWNER, timeout_s=LIFETIME_S)
    frozen = manager.create(OWNER, timeout_s=LIFETIME_S)
    for record in (running, frozen):
        manager.exec(OWNER, record.id, "x = 41")
    manager.freeze(OWNER, frozen.id)
    in_flight = SandboxRecord(id=new_sandbox_id(), owner=OWNER, state=CREATING, vm_dir="", template_id=None,
                              machine={"memory_mib": 256, "vcpus": 1}, timeout_s=LIFETIME_S)
    manager.registry.reserve([in_flight], manager._limits())
    keeper = PoolKeeper(manager.config, engine=engine)
    keeper.ages.monotonic = Monotonic()
    yield manager, keeper, running.id, frozen.id, in_flight.id
    keeper.registry.close()


def states(manager: SandboxManager) -> dict[str, str]:
    return {record.id: record.state for record in manager.registry.list()}


@pytest.mark.parametrize("jump", [DAY, -DAY], ids=["forward", "back"])
def test_a_clock_jump_closes_nothing_and_releases_no_place(scene, jump):
    manager, keeper, running, frozen, in_flight = scene
    keeper.reap()  # the keeper has been watching since before the jump
    keeper.clock = lambda: time.time() + jump
    keeper.ages.monotonic.now += 5  # a few seconds pass on the keeper's own clock
    for _ in range(3):
        keeper.reap()
    assert states(manager) == {running: RUNNING, frozen: FROZEN, in_flight: CREATING}
    assert manager.exec(OWNER, running, "print(x)").stdout == "41\n"
    manager.resume(OWNER, frozen)
    assert manager.exec(OWNER, frozen, "print(x)").stdout == "41\n"


def test_after_a_forward_jump_an_idle_sandbox_still_goes_once_its_lifetime_passed(scene):
    """The guard must not keep sandboxes for ever: the keeper's own clock reaching the lifetime closes them."""
    manager, keeper, running, frozen, _in_flight = scene
    keeper.reap()
    keeper.clock = lambda: time.time() + DAY
    keeper.ages.monotonic.now += LIFETIME_S + TOUCH_EVERY_S + 1
    keeper.reap()
    assert running not in states(manager)
    keeper.ages.monotonic.now += _RESERVATION_LIFETIME_S
    keeper.reap()
    assert states(manager) == {frozen: FROZEN}  # the abandoned place given back; the frozen one untouched


def test_a_vm_nobody_registered_is_stopped_and_registered_ones_are_not(scene, engine):
    """The keeper killed between starting a clone and registering it left that VM running for ever (found by
    tests/reliability/test_faults.py, case keeper): the next keeper stops VMs no registry row names."""
    manager, keeper, running, frozen, in_flight = scene
    orphan = engine.clone(manager.templates.current(), new_sandbox_id())
    keeper.reap()
    assert not orphan.running
    assert states(manager) == {running: RUNNING, frozen: FROZEN, in_flight: CREATING}
    assert manager.exec(OWNER, running, "print(x)").stdout == "41\n"
