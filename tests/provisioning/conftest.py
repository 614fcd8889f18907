"""Fixtures for the provisioning tests: the test bundle (built once a session) and throw-away test hosts."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import testbundle, testhost


def _require_test_host_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("provisioning tests need root (overlay mounts, veth links, systemd-nspawn)")
    missing = [tool for tool, package in (("systemd-nspawn", "systemd-container"), ("mmdebstrap", "mmdebstrap"))
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install systemd-container mmdebstrap")


@pytest.fixture(scope="session")
def test_bundle() -> tuple[Path, Path, bool]:
    """(bundle file, unpacked directory, bootable image?) built with the real bundle code."""
    _require_test_host_tools()
    return testbundle.build()


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pytest", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def test_host(request: pytest.FixtureRequest, ssh_key: Path) -> Iterator[testhost.Host]:
    """A fresh container for one test module (name from the module, at most 11 characters)."""
    _require_test_host_tools()
    name = "pt-" + request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:8].replace("_", "-")
    host = testhost.create(name, ssh_key.with_suffix(".pub").read_text())
    try:
        yield host
    finally:
        testhost.destroy(name)
