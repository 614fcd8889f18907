"""The pool keeper: one process per node, beside the API workers.

It boots and publishes the warm template, keeps `pool_size` clones of it ready so a create is a hand-out, closes
sandboxes past their idle lifetime, marks sandboxes whose VM died as lost, and removes templates nobody maps.
API workers never wait for any of this; they read the registry and the published template.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.engine import BootFailed, Engine, EngineError, Template, TemplateError

from .agent_check import AgentCheckServer, drain_flag
from .ages import Ages
from .errors import ServiceError
from .manager import SandboxManager, new_sandbox_id
from .registry import CREATING, LOST, POOLED, RESUMING, RUNNING, TOUCH_EVERY_S, Registry, SandboxRecord, is_busy
from .settings import ServiceConfig, load_service_config
from .template_store import TemplateStore

log = logging.getLogger("appliance.pool")
_TICK_S = 0.1
_HEALTH_EVERY_S = 2.0
_RESERVATION_LIFETIME_S = 900.0  # longer than any create or fork takes (a fork of 64 under TCG: minutes)
_PARENT_CHECK_S = 0.5
# A VM dir no registry row names is stopped when it is this old: every create, fork and resume reserves its row
# before it starts a VM, so only a process that died between starting one and registering it leaves such a dir.
_UNOWNED_VM_AGE_S = 60.0

MAX_TEMPLATE_BOOT_S = 600.0  # the longest boot deadline the keeper gives a template (the spec's own maximum)


def boot_deadlines(first_s: float, cap_s: float = MAX_TEMPLATE_BOOT_S) -> list[float]:
    """The boot deadlines of the template's tries: engine.boot_timeout_s, doubled each time, up to `cap_s`."""
    deadlines = [first_s]
    while deadlines[-1] < cap_s:
        deadlines.append(min(deadlines[-1] * 2, cap_s))
    return deadlines


class PoolKeeper:
    def __init__(self, config: ServiceConfig, engine: Engine | None = None) -> None:
        """`engine` is injected in tests; so is, as an attribute, `clock` (the wall clock) and `ages.monotonic`."""
        self.config = config
        self.engine = engine or Engine(config.engine)
        self.clock: Callable[[], float] = time.time
        self.ages = Ages()
        self.registry = Registry(config.registry_path)
        self.templates = TemplateStore(config.templates_dir)
        self.manager = SandboxManager(config, engine=self.engine, registry=self.registry)
        self._stop = threading.Event()
        self._keep_pool = False

    def stop(self, keep_pool: bool = False) -> None:
        """End run(); `keep_pool`: leave the pooled clones (another keeper is taking over, and counts on them)."""
        self._keep_pool = keep_pool
        self._stop.set()

    def follow_parent(self, parent: int) -> None:
        """Stop when the process that started us (the gunicorn master) is gone: a master killed with SIGKILL cannot
        stop us, and a keeper outliving it would reap and fill beside the next service's keeper. The pool is left
        to that one. (Checked in a thread: run() may be in a long template boot.)"""
        def watch() -> None:
            while not self._stop.wait(_PARENT_CHECK_S):
                if os.getppid() != parent:
                    log.warning("the API master (pid %d) is gone; the pool keeper stops with it", parent)
                    self.stop(keep_pool=True)
                    return

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()

    def ensure_template(self) -> Template:
        """Reuse the published template if it was made for this image and machine, else make a new one."""
        current = self.templates.current()
        if current is not None and self.engine.template_fits(current, self.config.agent_ports):
            return current
        log.info("booting a new template (accelerator %s)", self.engine.accelerator.name)
        started = time.monotonic()
        deadlines = boot_deadlines(self.config.engine.boot_timeout_s)
        for attempt, deadline in enumerate(deadlines, start=1):
            try:
                template = self.engine.make_template(self.config.agent_ports, self.config.warm_code, deadline)
                break
            except BootFailed as exc:
                if attempt == len(deadlines) or self._stop.is_set():
                    raise
                # A host loaded by other work can boot slower than the deadline every time: killing the guest
                # just short of ready and starting over would never end. The next try waits longer.
                log.warning("the template did not boot within %gs (%s); trying again with %gs", deadline, exc,
                            deadlines[attempt])
        self.templates.publish(template)
        self.templates.clear_failure()
        log.info("template %s warm in %.1fs", template.template_id, time.monotonic() - started)
        return template

    def fill_pool(self, template: Template) -> None:
        while not self._stop.is_set():
            pooled = self.registry.count(states=(POOLED,))
            if pooled >= self.config.pool_size:
                return
            if self.registry.count() + pooled >= self.config.max_sandboxes:
                return
            if not self.manager.has_room(template.machine.memory_mib, template.machine.vcpus):
                return  # pooled clones commit memory too: users' sandboxes come first
            sandbox_id = new_sandbox_id(self.config.node_tag)
            try:
                sandbox = self.engine.clone(template, sandbox_id)
            except BootFailed as exc:
                log.error("could not clone the template: %s", exc)
                return
            try:
                # A new QEMU starts with an empty translation cache (TCG): the first exec in a clone is several
                # times slower than the next. Pay for it here, not in the user's first call.
                sandbox.run_code("pass")
            except EngineError as exc:
                log.error("a fresh clone failed its first exec, dropped: %s", exc)
                sandbox.close()
                return
            try:
                self.registry.add(
                    SandboxRecord(
                        id=sandbox_id, owner=None, state=POOLED, vm_dir=str(sandbox.vm_dir),
                        template_id=template.template_id, machine=self.engine.machine_json(sandbox),
                        timeout_s=self.config.sandbox_timeout_s,
                    )
                )
            except BaseException:
                sandbox.close()  # not registered: nobody else would ever stop it
                raise
            sandbox.detach()

    def reap(self) -> None:
        """Freeze (persistent) or close sandboxes idle past their lifetime; mark those whose VM died as lost;
        give back places reserved by requests whose process died before finishing them."""
        now = self.clock()
        for stale in self.registry.stale_reservations(now - _RESERVATION_LIFETIME_S):
            if self.ages.unchanged_for(("reserved", stale.id), (stale.state, stale.last_active_at)) \
                    < _RESERVATION_LIFETIME_S:
                continue  # stale by the wall clock only: it may have jumped (ages.py)
            log.warning("releasing the place reserved for %s: its request never finished", stale.id)
            self.registry.release([stale.id])
        for stale in self.registry.stale_snapshots(now - _RESERVATION_LIFETIME_S):
            log.warning("dropping snapshot %r being saved of %s: its request never finished", stale.name, stale.source)
            self.registry.remove_snapshot(stale.owner, stale.name)  # its files, if any, go with remove_unused
        for record in self.registry.idle_since(now):
            if self.ages.unchanged_for(("used", record.id), record.last_active_at) < record.timeout_s + TOUCH_EVERY_S:
                continue  # idle by the wall clock only: it may have jumped (ages.py)
            if record.persistent:
                log.info("freezing %s: idle for more than %gs", record.id, record.timeout_s)
                try:
                    self.manager.freeze_record(record)
                    continue
                except ServiceError as exc:
                    log.error("could not freeze idle %s (%s); it keeps running", record.id, exc.message)
                    self.registry.touch(record.id)  # try again after another idle period, not every tick
                    continue
            log.info("closing %s: idle for more than %gs", record.id, record.timeout_s)
            self._kill(record)
            self.registry.remove(record.id)
        for record in self.registry.list(state=RUNNING) + self.registry.list(state=POOLED):
            if not self._alive(record):
                if record.state == POOLED:
                    self.registry.remove(record.id)
                else:
                    log.warning("sandbox %s lost: its VM is not running", record.id)
                    self.registry.set_state(record.id, LOST)
        self._watch_every_stamp()
        owned = {record.id for record in self.registry.list()}
        for vm_dir in self.engine.unowned_vm_dirs(owned, _UNOWNED_VM_AGE_S):
            log.warning("stopping the VM in %s: no sandbox owns it (its maker died before registering it)", vm_dir.name)
            self.engine.stop_dir(vm_dir)
        for namespace in self.engine.remove_network_leftovers():
            log.warning("removed %s: a sandbox network whose VM is gone (left by a crash)", namespace)

    def _watch_every_stamp(self) -> None:
        """Start watching each running sandbox's last use and each reservation now, not when the wall clock first
        calls it idle or stale: so the keeper's own count reaches a lifetime when the wall clock does, if no jump
        came between. Records that are gone are forgotten."""
        keys = []
        for record in self.registry.list():
            if record.state == RUNNING:
                keys.append(("used", record.id))
                self.ages.unchanged_for(keys[-1], record.last_active_at)
            elif record.state in (CREATING, RESUMING):
                keys.append(("reserved", record.id))
                self.ages.unchanged_for(keys[-1], (record.state, record.last_active_at))
        self.ages.keep_only(keys)

    def run(self) -> None:
        template = self.ensure_template()
        self.templates.remove_unused(self.registry)
        last_health = 0.0
        while not self._stop.is_set():
            try:
                self.fill_pool(template)
                if time.monotonic() - last_health > _HEALTH_EVERY_S:
                    self.reap()
                    self.templates.remove_unused(self.registry)
                    last_health = time.monotonic()
            except Exception as exc:
                if not is_busy(exc):
                    raise
                log.warning("the registry is locked by another process (%s); trying again", exc)
            self._stop.wait(_TICK_S)
        self.shutdown()

    def shutdown(self) -> None:
        """Pooled clones are cheap to remake: stop them. Sandboxes users hold keep running for the next start."""
        for record in [] if self._keep_pool else self.registry.list(state=POOLED):
            self._kill(record)
            self.registry.remove(record.id)
        self.registry.close()

    def _alive(self, record: SandboxRecord) -> bool:
        return self.engine.is_running(Path(record.vm_dir), record.machine)

    def _kill(self, record: SandboxRecord) -> None:
        self.engine.stop(Path(record.vm_dir), record.machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="appliance pool keeper (started by `appliance serve`)")
    parser.add_argument("--spec", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pool %(levelname)s %(message)s")

    keeper = PoolKeeper(load_service_config(args.spec))
    signal.signal(signal.SIGTERM, lambda *_: keeper.stop())
    signal.signal(signal.SIGINT, lambda *_: keeper.stop())
    agent = None
    if keeper.config.agent_check_port is not None:  # the fleet balancer's view of this node's room
        agent = AgentCheckServer("0.0.0.0", keeper.config.agent_check_port, keeper.manager.free_capacity,
                                 drain_flag(keeper.config.state_dir)).start()
    keeper.follow_parent(os.getppid())
    try:
        keeper.run()
    except (TemplateError, BootFailed) as exc:
        log.error("the pool keeper cannot warm a template: %s", exc)
        keeper.templates.record_failure(str(exc))
        return 1
    except Exception as exc:  # a bug or a host problem: readiness says so while the supervisor restarts the keeper
        keeper.templates.record_failure(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if agent is not None:
            agent.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
