"""Every Molecule scenario, in full (create, prepare, converge, idempotence, verify, destroy), against throw-away
systemd-nspawn hosts with no default route, and every testinfra check of every scenario as a pytest test of its own.

`test_molecule_scenario[<scenario>]` runs `molecule test` once and fails when a step does (converge, idempotence,
destroy, ...; the whole log is kept under the pytest temp dir and its tail is in the message). The verify step
writes junit XML (PYTEST_ADDOPTS reaches the testinfra pytest that molecule starts), and
`test_testinfra[<scenario>/<file>::<check>]` reports each check from it: passed, failed with its message, or
skipped with its reason. The checks are listed from the scenario's test files before anything runs, so a check that
never ran (converge failed, file not collected) fails by name too; a failed check fails there, not a second time in
the scenario's test.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.provisioning

PROJECT = Path(__file__).resolve().parents[2]
SCENARIOS = ["kvm_host", "firewall", "guest_images", "appliance_api", "site"]
NEEDS_BOOTABLE_IMAGE = {"site"}  # it creates sandboxes on the node: a stand-in image cannot boot


def testinfra_checks() -> list[tuple[str, str]]:
    """(scenario, "file.py::test_name") for every module-level test function of every scenario's tests/."""
    checks = []
    for scenario in SCENARIOS:
        for path in sorted((PROJECT / "molecule" / scenario / "tests").glob("test_*.py")):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    checks.append((scenario, f"{path.name}::{node.name}"))
    return checks


@dataclass
class Case:
    name: str  # as the testinfra run named it, e.g. test_x[ansible://mol-site]
    outcome: str  # passed, failed, skipped
    message: str = ""


@dataclass
class ScenarioRun:
    scenario: str
    returncode: int
    log: Path
    elapsed_s: float
    cases: dict[str, list[Case]] = field(default_factory=dict)  # by "file.py::test_name"

    def failed_steps(self) -> list[str]:
        """From molecule's closing DETAILS lines, e.g. "site > verify: Executed: Failed (Verifier tests failed)"."""
        pattern = rf"^{re.escape(self.scenario)} > (\w+): Executed: Failed"
        found = re.findall(pattern, self.log.read_text(errors="replace"), re.MULTILINE)
        return list(dict.fromkeys(found))

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def read_junit(path: Path) -> dict[str, list[Case]]:
    """The testcases of a junit XML file, grouped by check (one case per host the check ran on)."""
    cases: dict[str, list[Case]] = {}
    if not path.exists():
        return cases
    for element in ElementTree.parse(path).iter("testcase"):
        module = element.get("classname", "").rsplit(".", 1)[-1]
        name = element.get("name", "")
        outcome, message = "passed", ""
        for child in element:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = f"{child.get('message', '')}\n{child.text or ''}".strip()
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        cases.setdefault(f"{module}.py::{name.split('[', 1)[0]}", []).append(Case(name, outcome, message))
    return cases


class ScenarioRunner:
    """Runs each scenario at most once a session, whichever test asks first."""

    def __init__(self, bundle: tuple[Path, Path, bool], logs: Path) -> None:
        self.bundle = bundle
        self.logs = logs
        self.runs: dict[str, ScenarioRun] = {}

    def run(self, scenario: str) -> ScenarioRun:
        if scenario not in self.runs:
            self.runs[scenario] = self._run(scenario)
        return self.runs[scenario]

    def _run(self, scenario: str) -> ScenarioRun:
        _, unpacked, bootable = self.bundle
        log, junit = self.logs / f"{scenario}.log", self.logs / f"{scenario}.testinfra.xml"
        if scenario in NEEDS_BOOTABLE_IMAGE and not bootable:
            log.write_text("not run: the test bundle holds a stand-in guest image that cannot boot; build the guest "
                           "image first (`appliance build guest`; `make test` does)\n")
            return ScenarioRun(scenario, -1, log, 0.0)
        venv_bin = str(Path(sys.executable).parent)
        # -rP: what passed checks print (measured figures, e.g. health-check latency under slow clients) in the log
        addopts = f"{os.environ.get('PYTEST_ADDOPTS', '')} --junitxml={junit} -o junit_family=xunit2 -rP".strip()
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
               "APPLIANCE_TEST_BUNDLE_DIR": str(unpacked), "PYTEST_ADDOPTS": addopts,
               "ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0"}
        junit.unlink(missing_ok=True)
        started = time.monotonic()
        with log.open("w") as output:
            done = subprocess.run([f"{venv_bin}/molecule", "test", "--scenario-name", scenario], cwd=PROJECT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        return ScenarioRun(scenario, done.returncode, log, time.monotonic() - started, read_junit(junit))


@pytest.fixture(scope="session")
def scenarios(test_bundle, tmp_path_factory: pytest.TempPathFactory) -> ScenarioRunner:
    return ScenarioRunner(test_bundle, tmp_path_factory.mktemp("molecule"))


def test_every_scenario_is_listed():
    found = sorted(p.parent.name for p in (PROJECT / "molecule").glob("*/molecule.yml"))
    assert found == sorted(SCENARIOS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(scenario: str, scenarios: ScenarioRunner) -> None:
    """Every step but verify's checks: those fail as test_testinfra[...] by name, not twice."""
    run = scenarios.run(scenario)
    failed_checks = [case for cases in run.cases.values() for case in cases if case.outcome == "failed"]
    failed_steps = run.failed_steps()
    if run.returncode != 0 and not (failed_steps == ["verify"] and failed_checks):
        pytest.fail(f"molecule test -s {scenario} failed after {run.elapsed_s:.0f}s in "
                    f"{', '.join(failed_steps) or 'an unknown step'} (log: {run.log}):\n{run.tail()}", pytrace=False)
    known = {check for owner, check in testinfra_checks() if owner == scenario}
    assert set(run.cases) <= known, f"testinfra ran checks this runner does not list: {set(run.cases) - known}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("scenario", "check"), testinfra_checks(),
                         ids=[f"{scenario}/{check}" for scenario, check in testinfra_checks()])
def test_testinfra(scenario: str, check: str, scenarios: ScenarioRunner) -> None:
    run = scenarios.run(scenario)
    cases = run.cases.get(check)
    if not cases:
        pytest.fail(f"{check} did not run: molecule test -s {scenario} ended with {run.returncode} before or during "
                    f"verify (log: {run.log}):\n{run.tail(15)}", pytrace=False)
    failed = [case for case in cases if case.outcome == "failed"]
    if failed:
        pytest.fail("\n\n".join(f"{case.name}:\n{case.message}" for case in failed), pytrace=False)
    if all(case.outcome == "skipped" for case in cases):
        pytest.skip(f"{scenario}/{check}: " + "; ".join(sorted({case.message for case in cases})))
