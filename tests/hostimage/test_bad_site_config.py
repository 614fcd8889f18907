"""Bad input: a node whose site.toml is missing or malformed still boots, keeps the API down, and says exactly
what is wrong on the console and in the journal. Both nodes boot at the same time (they only need to get as far
as the setup step)."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.build.host.image import HostImage

from . import nodevm
from .conftest import BOOT_DEADLINE_S, boot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

BAD_NETWORK = "10.0.0.0/33"
EXPECTED = (f"site configuration problem: api.allowed_networks[0]: '{BAD_NETWORK}' is not an IPv4 or IPv6 network "
            "(e.g. 192.0.2.0/24 or 2001:db8::/32)")
MISSING = "site configuration problem: the appliance-config partition has no site.toml"


@pytest.fixture(scope="module")
def bad_nodes(host_image: HostImage, node_key: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, nodevm.NodeVM]]:
    malformed = nodevm.site_toml(node_key.with_suffix(".pub").read_text()).replace(
        'allowed_networks = ["10.0.2.2/32"]', f'allowed_networks = ["{BAD_NETWORK}"]')
    nodes: dict[str, nodevm.NodeVM] = {}
    workdirs = []
    try:
        for name, firmware, site in (("missing", "bios", None), ("malformed", "uefi", malformed)):
            workdir = tmp_path_factory.mktemp(f"bad-{name}")
            workdirs.append(workdir)
            nodes[name] = boot(host_image.path, workdir, firmware, site)
        yield nodes
    finally:
        for vm in nodes.values():
            vm.stop()
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


def _api_answers(vm: nodevm.NodeVM) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{vm.api_port}/v1/healthz", timeout=10):
            return True
    except OSError:
        return False


def test_missing_site_config_keeps_the_api_down_and_the_console_says_why(bad_nodes) -> None:
    vm = bad_nodes["missing"]
    text = vm.wait_console("NOT READY", BOOT_DEADLINE_S)
    assert MISSING in text
    assert "The API stays down: fix site.toml on the appliance-config partition and reboot" in text
    assert "login:" in vm.wait_console("login:", 300)  # the node itself came up
    assert not _api_answers(vm)


def test_malformed_site_config_keeps_the_api_down_and_console_and_journal_say_why(bad_nodes, node_key) -> None:
    vm = bad_nodes["malformed"]
    text = vm.wait_console("NOT READY", BOOT_DEADLINE_S)
    assert EXPECTED in text
    vm.wait_ssh(node_key, BOOT_DEADLINE_S)  # the site's SSH keys still apply: the node stays repairable
    journal = vm.ssh(node_key, "journalctl --boot --unit appliance-node-setup --no-pager --output cat").stdout
    assert EXPECTED in journal
    states = vm.ssh(node_key, "systemctl is-active appliance-api.service; "
                              "systemctl is-failed appliance-node-setup.service").stdout.split()
    assert states == ["inactive", "failed"], states
    assert not _api_answers(vm)
