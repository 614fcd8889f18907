"""Bad input fails fast, names the problem in one line, and changes nothing on the host.

Each case runs the real `appliance deploy` command (site playbook) against a fresh test host. "Nothing changed" is
checked on the host: no bundle repository, no apt source, no /etc/appliance, no /opt/appliance.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance.commands.deploy import deploy_command

from . import testhost

pytestmark = pytest.mark.provisioning

TRACES = ["/etc/apt/sources.list.d/appliance-bundle.list", "/var/lib/appliance-bundle", "/etc/appliance",
          "/opt/appliance", "/var/lib/appliance"]
GOOD_VARS = {"kvm_host_allow_tcg": True, "kvm_host_min_memory_mib": 1024, "kvm_host_min_disk_mib": 2048,
             "appliance_api_keys": ["pytest-key-0123456789abcdef"]}


def _inventory(tmp_path: Path, hosts: dict[str, dict], variables: dict) -> Path:
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump({"appliance": {"hosts": hosts, "vars": variables}}))
    return path


def _host_entry(host: testhost.Host, key: Path) -> dict:
    return {"ansible_host": host.address, "ansible_user": testhost.TEST_USER, "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}


def _deploy(inventory: Path, bundle: Path) -> tuple[int, str]:
    result = CliRunner().invoke(deploy_command, ["-i", str(inventory), "--bundle", str(bundle), "--quiet"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _assert_unchanged(host: testhost.Host, key: Path) -> None:
    check = " ; ".join(f"test ! -e {path} || echo {path}" for path in TRACES)
    found = subprocess.run([*testhost.ssh_argv(host, key), check], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "", f"the failed deploy left changes on the host: {found.stdout.split()}"


@pytest.fixture
def deploy_to(test_host, ssh_key, test_bundle, tmp_path):
    def run(variables: dict, bundle: Path | None = None, extra_hosts: dict | None = None) -> tuple[int, str]:
        hosts = {"target": _host_entry(test_host, ssh_key), **(extra_hosts or {})}
        code, output = _deploy(_inventory(tmp_path, hosts, variables), bundle or test_bundle[0])
        _assert_unchanged(test_host, ssh_key)
        return code, output
    return run


def test_wrong_variable_type_names_the_variable(deploy_to):
    code, output = deploy_to({**GOOD_VARS, "appliance_api_port": "eighty"})
    assert code != 0
    assert "appliance_api_port" in output and "int" in output
    assert "Traceback" not in output


def test_missing_secret_names_it(deploy_to):
    variables = {k: v for k, v in GOOD_VARS.items() if k != "appliance_api_keys"}
    code, output = deploy_to(variables)
    assert code != 0
    assert "appliance_api_keys" in output and "missing" in output.lower()


def test_kvm_missing_without_tcg_opt_in_names_the_switch(deploy_to):
    code, output = deploy_to({**GOOD_VARS, "kvm_host_allow_tcg": False})
    assert code != 0
    assert "KVM is not usable" in output and "kvm_host_allow_tcg" in output


def test_corrupted_bundle_is_refused_before_anything_runs(deploy_to, test_bundle, tmp_path):
    corrupted = tmp_path / "corrupted.tar"
    shutil.copyfile(test_bundle[0], corrupted)
    with tarfile.open(corrupted) as tar:
        victim = next(m for m in tar.getmembers() if m.name.startswith("wheels/appliance-"))
    with corrupted.open("r+b") as stream:
        stream.seek(victim.offset_data + victim.size // 2)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0xFF]))
    code, output = deploy_to(GOOD_VARS, bundle=corrupted)
    assert code != 0
    assert victim.name in output and "checksum mismatch" in output


def test_unreachable_host_stops_every_host(deploy_to):
    # Nothing listens on port 1 of this machine's loopback: the connection is refused at once, no traffic leaves.
    dead = {"ansible_host": "127.0.0.1", "ansible_port": 1, "ansible_user": testhost.TEST_USER}
    code, output = deploy_to(GOOD_VARS, extra_hosts={"dead": dead})
    assert code != 0
    assert "dead: unreachable" in output
