"""Every Molecule scenario, in full (create, prepare, converge, idempotence, verify, destroy), against throw-away
systemd-nspawn hosts with no default route. One test per scenario, so a failure names the role; the scenario's whole
log is kept under the pytest temp dir and its tail is in the failure message."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.provisioning

PROJECT = Path(__file__).resolve().parents[2]
SCENARIOS = ["kvm_host", "firewall", "guest_images", "appliance_api", "site"]


def test_every_scenario_is_listed():
    found = sorted(p.parent.name for p in (PROJECT / "molecule").glob("*/molecule.yml"))
    assert found == sorted(SCENARIOS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str, test_bundle, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, unpacked, _ = test_bundle
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "APPLIANCE_TEST_BUNDLE_DIR": str(unpacked),
           "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0"}
    log = tmp_path_factory.mktemp("molecule") / f"{scenario}.log"
    started = time.monotonic()
    with log.open("w") as output:
        result = subprocess.run([f"{venv_bin}/molecule", "test", "--scenario-name", scenario], cwd=PROJECT, env=env,
                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    assert result.returncode == 0, f"molecule test -s {scenario} failed after {elapsed:.0f}s (log: {log}):\n{tail}"
