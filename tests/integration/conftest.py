"""Fixtures that boot real microVMs from the built guest image (`appliance build guest` must have run)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.spec import guest_image_dir, load_spec
from service import settings
from service.engine import Engine, ImageNotFound
from tests.vmtools import kill_qemus_under


@pytest.fixture(scope="session")
def spec():
    return load_spec()


@pytest.fixture(scope="session")
def image_dir(spec) -> Path:
    directory = guest_image_dir(spec)
    if not (directory / "manifest.json").exists():
        pytest.fail(f"no guest image at {directory}: run 'appliance build guest' (make test does) first")
    return directory


@pytest.fixture(scope="session")
def run_root():
    """A run dir on tmpfs for this session's VMs; every QEMU under it is ended at the end, whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="appliance-test-", dir="/dev/shm"))
    yield root
    kill_qemus_under(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run_dir(run_root, request) -> Path:
    # short: QEMU's unix sockets live below it, and socket paths must stay under 108 bytes
    directory = run_root / request.node.name.removeprefix("test_")[:16].replace("[", "_").replace("]", "_")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def engine(spec, image_dir, run_root) -> Engine:
    try:
        return Engine(replace(settings.engine_config(spec, image_dir), run_dir=run_root / "engine",
                              secret_file=run_root / "deployment.secret"))
    except ImageNotFound as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def sandbox(engine):
    """One booted sandbox shared by a module's tests (boots are slow under TCG)."""
    with engine.boot() as sb:
        yield sb


@pytest.fixture(scope="session")
def root_engine(engine) -> Engine:
    """The opt-in: user code as root in the guest (engine.code_user = "root"), for what only root could try."""
    return Engine(replace(engine.config, code_user="root", run_dir=engine.config.run_dir.with_name("root")))


@pytest.fixture(scope="session")
def jailed_engine(spec, image_dir, run_root) -> Engine:
    """An engine whose VMs run in the VMM jail whatever the spec says (isolation tests need it on)."""
    import os

    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("the VMM jail needs root and bubblewrap (apt-get install bubblewrap)")
    config = settings.engine_config(spec, image_dir)
    return Engine(replace(config, run_dir=run_root / "jailed", isolation=settings.jail_policy(spec),
                          secret_file=run_root / "deployment.secret"))
