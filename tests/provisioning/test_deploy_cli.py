"""`appliance deploy` as an operator runs it: the installed entry point in a subprocess, against a throw-away host.

The default playbook (site.yml: precheck, then converge) turns a fresh Debian 12 container into a node from the test
bundle; `--check` then finds nothing to change. A file changed on the node by hand is what a dry run must show (with
its diff) and leave as it is: that proves `--check` looks at the host and changes nothing, which a converged host
alone cannot (a real second run would report no change too).
"""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from . import testhost

pytestmark = pytest.mark.provisioning

APPLIANCE = Path(sys.executable).parent / "appliance"
# A hang deadline, far above a converge of this host (about a minute here).
DEPLOY_TIMEOUT_S = 900
API_KEY = "pytest-deploy-cli-key-0123456789"
SPEC_ON_HOST = "/etc/appliance/appliance.toml"
DRIFT = "# changed by hand on the node"


def _inventory(directory: Path, host: testhost.Host, key: Path) -> Path:
    inventory = directory / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"appliance": {
        "hosts": {"node": {
            "ansible_host": host.address, "ansible_user": testhost.TEST_USER, "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        }},
        "vars": {
            # the container has /dev/kvm without vmx/svm (nested PVM): sandboxes run under TCG here
            "kvm_host_allow_tcg": True, "kvm_host_min_memory_mib": 1024, "kvm_host_min_disk_mib": 2048,
            "appliance_api_keys": [API_KEY],
            # this machine's end of the test veths, so the test can ask the API over the link
            "firewall_api_sources": [f"{testhost.NET_PREFIX}.0.0/16"],
            # the least a node runs: no warm clones, no KVM probe (the deploy only waits for /healthz)
            "appliance_api_pool_size": 0, "appliance_api_accelerator": "tcg",
        },
    }}))
    return inventory


def deploy(inventory: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [str(APPLIANCE), "deploy", "-i", str(inventory), "--bundle", str(bundle), *extra]
    return subprocess.run(argv, cwd=inventory.parent, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=DEPLOY_TIMEOUT_S)


def changed_count(result: subprocess.CompletedProcess, host: str = "node") -> int:
    """The changed count of `host`, from the CLI's own summary line; Ansible's recap must agree with it."""
    summary = re.search(rf"(?m)^{host}: ok \((\d+) changed, \d+ ok, 0 failed", result.stdout)
    recap = re.search(rf"(?m)^{host}\s+: ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0", result.stdout)
    assert summary and recap, f"no summary for {host}:\n{result.stdout[-3000:]}\n{result.stderr}"
    assert summary[1] == recap[1]
    return int(summary[1])


def _on_host(host: testhost.Host, key: Path, command: str) -> str:
    """The command's stdout; its exit status is for the caller to judge by what it printed."""
    return subprocess.run([*testhost.ssh_argv(host, key), command], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def converged(test_host, ssh_key, test_bundle, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(inventory, bundle, the first deploy's result) after `appliance deploy` converged the fresh host."""
    if not APPLIANCE.exists():
        pytest.fail(f"{APPLIANCE} is not installed: `pip install -e .` (make setup) installs the entry point")
    inventory = _inventory(tmp_path_factory.mktemp("deploy-cli"), test_host, ssh_key)
    return inventory, test_bundle[0], deploy(inventory, test_bundle[0])


@pytest.mark.timeout(DEPLOY_TIMEOUT_S * 2)
def test_deploy_converges_a_fresh_host_into_a_node(converged, test_host, ssh_key):
    _, _, result = converged
    assert result.returncode == 0, f"deploy failed:\n{result.stderr}\n{result.stdout[-3000:]}"
    assert changed_count(result) > 0  # a fresh host: the roles really ran
    state = _on_host(test_host, ssh_key, "systemctl is-active appliance-api.service").strip()
    assert state == "active", f"appliance-api.service is {state!r} after the deploy"
    # The API answers on the node's address, over the test's own veth link, through HAProxy with TLS: the
    # certificate comes from the site CA the deploy made beside the inventory.
    inventory, _, _ = converged
    tls = ssl.create_default_context(cafile=inventory.parent / "appliance-ca" / "ca.pem")
    with urllib.request.urlopen(f"https://{test_host.address}:8443/v1/healthz", timeout=30, context=tls) as response:
        assert response.status == 200


@pytest.mark.timeout(DEPLOY_TIMEOUT_S * 2)
def test_deploy_check_on_a_converged_host_reports_no_change(converged):
    inventory, bundle, first = converged
    assert first.returncode == 0, "the converge failed; see the test before this one"
    check = deploy(inventory, bundle, "--check")
    assert check.returncode == 0, f"deploy --check failed:\n{check.stderr}\n{check.stdout[-3000:]}"
    assert changed_count(check) == 0, f"--check would change a converged host:\n{check.stdout[-3000:]}"


@pytest.mark.timeout(DEPLOY_TIMEOUT_S * 2)
def test_deploy_check_shows_a_change_made_by_hand_and_leaves_it(converged, test_host, ssh_key):
    inventory, bundle, first = converged
    assert first.returncode == 0, "the converge failed; see the first test of this module"
    _on_host(test_host, ssh_key, f"echo '{DRIFT}' | sudo tee -a {SPEC_ON_HOST}")
    assert DRIFT in _on_host(test_host, ssh_key, f"sudo cat {SPEC_ON_HOST}")
    try:
        check = deploy(inventory, bundle, "--check", "--playbook", "deploy")
        assert check.returncode == 0, f"deploy --check failed:\n{check.stderr}\n{check.stdout[-3000:]}"
        assert changed_count(check) >= 1
        assert f"-{DRIFT}" in check.stdout  # the diff shows the line the converge would remove
        assert DRIFT in _on_host(test_host, ssh_key, f"sudo cat {SPEC_ON_HOST}"), "--check changed the host"
    finally:  # the host converged again, whatever order the tests of this module run in
        _on_host(test_host, ssh_key, f"sudo sed -i '/^{DRIFT}$/d' {SPEC_ON_HOST}")
