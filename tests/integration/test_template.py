"""Copy-on-write templates: a warm VM saved once, clones that start from its exact state."""

from __future__ import annotations

import hashlib
import time

import pytest

from service.engine.template import Template

pytestmark = pytest.mark.integration


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def template(engine, run_root):
    tpl = Template.create(
        engine.machine(memory_mib=512),
        run_root / "templates",
        engine.config.limits,
        engine.config.boot_timeout_s,
        warm_code="import random, numpy as np\nwarm = 41\nrandom.seed(0); np.random.seed(0)",
        launcher=engine.launcher,
    )
    yield tpl
    tpl.remove()


def test_clones_start_from_the_template_state_and_diverge(engine, template, run_root):
    memory_before = file_digest(template.directory / "memory")
    where, launcher = run_root / "clones", engine.launcher
    with template.clone(where, _limits(), launcher) as a, template.clone(where, _limits(), launcher) as b:
        assert a.run_code("warm").text == "41" and b.run_code("warm").text == "41"
        # the clone's first exec did not wait for the agent's slow probe of its port (SIGIO or already open)
        assert a.call("ping")["connected_by"] != "probe"
        a.run_code("warm += 1")
        assert a.run_code("warm").text == "42"
        assert b.run_code("warm").text == "41"  # isolated from each other
        draws = {sb.run_code("(random.random(), float(np.random.rand()))").text for sb in (a, b)}
        assert len(draws) == 2  # both RNGs reseeded differently, though the template seeded them identically
        kernel = {sb.run_code("import os; os.urandom(16).hex()").text for sb in (a, b)}
        assert len(kernel) == 2
        for sb in (a, b):
            guest_time = float(sb.run_code("import time; time.time()").text)
            assert abs(guest_time - time.time()) < 1.0
    assert file_digest(template.directory / "memory") == memory_before  # clones never write the template


def test_template_survives_reload_from_disk(engine, template, run_root):
    reloaded = Template.load(template.directory)
    assert reloaded.machine == template.machine
    with reloaded.clone(run_root / "clones", _limits(), launcher=engine.launcher) as sb:
        assert sb.run_code("warm * 2").text == "82"


def _limits():
    from tests.configs import exec_limits

    return exec_limits(timeout_s=30)
