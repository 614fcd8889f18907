"""Fixtures for the host image tests: one image built per session (its root stage cached in ~/.cache/appliance)
and an SSH key. The modules boot their nodes in module fixtures that stop them (by PID) and remove their disks
whatever the tests did."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.build.host.image import HostImage, build_host_image, preflight_problem
from appliance.progress import Progress
from appliance.spec import load_spec

from . import nodevm

# Generous: under TCG a node boots in 1-2 minutes here, a sandbox inside it (TCG in TCG) takes minutes more.
BOOT_DEADLINE_S = 900
EXEC_DEADLINE_S = 1500


def _require_tools() -> None:
    problem = preflight_problem(os.geteuid(), shutil.which, "raw")
    if problem:
        pytest.fail(f"{problem} (the Makefile's host-packages target installs them)")
    if not nodevm.OVMF_CODE.exists():
        pytest.fail(f"no UEFI firmware at {nodevm.OVMF_CODE}: apt-get install ovmf")


@pytest.fixture(scope="session")
def host_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostImage]:
    _require_tools()
    directory = tmp_path_factory.mktemp("hostimage")
    image = build_host_image(load_spec(), directory / "node.img", progress=Progress(quiet=True))
    yield image
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("nodessh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pytest-node", "-f", str(key)], check=True)
    return key


def boot(image: Path, workdir: Path, firmware: str, site: str | None) -> nodevm.NodeVM:
    workdir.mkdir(parents=True, exist_ok=True)
    disk = nodevm.prepare_disk(image, workdir / "disk.raw", site)
    return nodevm.NodeVM(disk, firmware, workdir).start()
