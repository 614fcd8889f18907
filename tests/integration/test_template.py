"""Copy-on-write templates: a warm VM saved once, clones that start from its exact state."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

from service.engine.template import Template, give_back_zero_pages

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


def test_a_template_file_cannot_be_written_by_its_clones(engine, template, run_root):
    memory = template.directory / "memory"
    before, allocated = file_digest(memory), memory.stat().st_blocks
    with template.clone(run_root / "clones", _limits(), engine.launcher) as clone:
        # The clone's QEMU holds the file read-only and maps it privately: the kernel refuses it any write.
        opened = [fd for fd in Path(f"/proc/{clone.vm.pid}/fd").iterdir() if fd.resolve() == memory.resolve()]
        flags = [int(re.search(r"flags:\s+(\d+)", (fd.parent.parent / "fdinfo" / fd.name).read_text())[1], 8)
                 for fd in opened]
        assert flags and all(flag & os.O_ACCMODE == os.O_RDONLY for flag in flags)
        maps = [line.split()[1] for line in Path(f"/proc/{clone.vm.pid}/maps").read_text().splitlines()
                if line.endswith(str(memory.resolve()))]
        assert maps and all(perms.endswith("p") for perms in maps)  # private: writes stay in the clone
        wrote = clone.run_code("big = np.full(24 << 20, 7.0)\n"  # 192 MiB of guest memory written, and files
                               "open('/tmp/fill', 'wb').write(b'x' * (16 << 20))\n"
                               "int(big.sum()) // 7", timeout_s=120)
        assert wrote.text == str(24 << 20)
    assert file_digest(memory) == before
    # Writing fresh pages faulted the file's holes in (as zero pages); they are given back, the file as made.
    give_back_zero_pages(memory)
    assert memory.stat().st_blocks <= allocated


def test_template_survives_reload_from_disk(engine, template, run_root):
    reloaded = Template.load(template.directory)
    assert reloaded.machine == template.machine
    with reloaded.clone(run_root / "clones", _limits(), launcher=engine.launcher) as sb:
        assert sb.run_code("warm * 2").text == "82"


def _limits():
    from tests.configs import exec_limits

    return exec_limits(timeout_s=30)
