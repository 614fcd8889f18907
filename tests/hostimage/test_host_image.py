"""The host image boots as a ready appliance node: once on UEFI (OVMF), once on legacy BIOS (SeaBIOS).

Each firmware gets its own disk copy and boot (QEMU TCG here, user-mode networking forwarded to 127.0.0.1 only);
the tests then look at the node over SSH with testinfra, as an operator would, and run code through its API.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.build.host.image import HostImage

from . import nodevm
from .conftest import BOOT_DEADLINE_S, EXEC_DEADLINE_S, boot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

# What each boot made for itself, compared across boots at the end (firmware -> facts).
SECRETS: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", params=nodevm.FIRMWARES)
def node(request: pytest.FixtureRequest, host_image: HostImage, node_key: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[nodevm.NodeVM]:
    firmware = request.param
    workdir = tmp_path_factory.mktemp(f"node-{firmware}")
    vm = None
    try:
        vm = boot(host_image.path, workdir, firmware, nodevm.site_toml(node_key.with_suffix(".pub").read_text()))
        vm.ssh_seconds = vm.wait_ssh(node_key, BOOT_DEADLINE_S)
        vm.api_seconds = vm.wait_http("/v1/healthz", BOOT_DEADLINE_S)
        yield vm
    finally:
        if vm is not None:
            vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def host(node: nodevm.NodeVM, node_key: Path):
    import testinfra

    return testinfra.get_host(
        f"ssh://root@127.0.0.1:{node.ssh_port}", ssh_identity_file=str(node_key),
        ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
    )


def test_console_says_where_the_api_is_and_where_the_key_is(node: nodevm.NodeVM) -> None:
    text = node.wait_console("clients send it as a Bearer token", 120)
    assert "appliance: node ready" in text
    assert "http://10.0.2.15:8080" in text and "/v1/healthz" in text
    assert "/etc/appliance/api-key" in text and "0600" in text


def test_api_service_is_enabled_and_running(host) -> None:
    api = host.service("appliance-api.service")
    assert api.is_enabled and api.is_running
    assert host.service("nftables.service").is_enabled
    assert host.service("appliance-node-setup.service").is_valid


def test_root_file_system_grew_to_the_disk(host, host_image: HostImage) -> None:
    root_partition_bytes = host_image.manifest["disk"]["virtual_size"]
    size = int(host.check_output("findmnt --noheadings --bytes --output SIZE /"))
    # the test disk is 2 GiB larger than the image: the root must have taken most of it
    assert size > root_partition_bytes + (1 << 30), (size, root_partition_bytes)
    assert "root file system grown to the disk" in host.check_output(
        "journalctl --boot --unit appliance-node-setup --no-pager --output cat")


def test_node_made_its_own_secrets(host, node: nodevm.NodeVM) -> None:
    key = host.file("/etc/appliance/api-key")
    assert key.exists and key.user == "root" and key.mode == 0o600
    env = host.file("/etc/appliance/api.env")
    assert env.mode == 0o600 and env.user == "root"
    api_key = key.content_string.strip()
    assert f"APPLIANCE_API_KEYS={api_key}" in env.content_string
    host_key = host.check_output("ssh-keygen -l -f /etc/ssh/ssh_host_ed25519_key.pub")
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert len(machine_id) == 32
    journal = host.check_output("journalctl --boot --unit appliance-node-setup --no-pager --output cat")
    assert "created this node's SSH host keys" in journal and "created this node's API key" in journal
    SECRETS[node.firmware] = {"host_key": host_key, "api_key": api_key, "machine_id": machine_id}


def test_no_build_leftovers_or_secrets_in_the_node(host) -> None:
    for path in ("/root/.ansible", "/usr/sbin/policy-rc.d", "/root/.cache"):
        assert not host.file(path).exists, path
    manifest = json.loads(host.file("/usr/lib/appliance-node/manifest.json").content_string)
    assert manifest["guest_image"]["manifest_sha256"]
    # the build recorded no key anywhere: the only key on the node is the one it made
    assert "appliance_api_keys" not in host.file("/usr/lib/appliance-node/role-vars.json").content_string


def test_firewall_lets_only_the_site_networks_reach_the_api(host) -> None:
    rules = host.check_output("nft list ruleset")
    assert "policy drop" in rules
    assert "ip saddr 10.0.2.2 tcp dport 8080 accept" in rules


def test_create_and_exec_through_the_api(node: nodevm.NodeVM, host, node_key: Path) -> None:
    from appliance.client import Sandbox

    api_key = host.file("/etc/appliance/api-key").content_string.strip()
    try:
        nodevm.ensure_nested_kvm(node, node_key, attempts=1)
    except nodevm.NestedKvmUnusable as exc:
        pytest.skip(str(exc))
    started = time.monotonic()
    with Sandbox(url=f"http://127.0.0.1:{node.api_port}", api_key=api_key, request_timeout=EXEC_DEADLINE_S,
                 ready_timeout=EXEC_DEADLINE_S) as sandbox:
        result = sandbox.run_code("import platform; print(platform.node()); 6 * 7")
    assert result.text == "42", result
    assert "sandbox" in result.stdout
    node.exec_seconds = time.monotonic() - started


def test_each_boot_made_different_secrets() -> None:
    if len(SECRETS) < 2:
        pytest.skip("needs both boots (UEFI and BIOS) to have run in this session")
    uefi, bios = SECRETS["uefi"], SECRETS["bios"]
    for fact in ("host_key", "api_key", "machine_id"):
        assert uefi[fact] != bios[fact], f"two nodes from one image share their {fact}"
