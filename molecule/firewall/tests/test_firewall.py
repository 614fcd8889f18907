"""The firewall as seen from the host and from the control machine: SSH open, the API port closed to us (we are not
in firewall_api_sources here), everything else dropped. Probes are real TCP connections from this machine over the
test host's veth link, against ports that do have a listener inside, so a closed port means the firewall closed it.
"""

import socket
import time

import pytest

testinfra_hosts = ["all"]

PROBE_PORTS = (8080, 9999)  # the API port (closed to us here) and a port nothing opens


def _connects(address: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def address(host):
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def listeners(host):
    """A TCP listener on each probe port inside the host, so only the firewall can make a connection fail."""
    for port in PROBE_PORTS:
        host.check_output(f"systemd-run --unit=probe-{port} --collect python3 -m http.server --bind 0.0.0.0 {port}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listening = host.check_output("ss -Htln").split()
        if all(f"0.0.0.0:{port}" in listening for port in PROBE_PORTS):
            break
        time.sleep(0.2)
    yield
    for port in PROBE_PORTS:
        host.run(f"systemctl stop probe-{port}")


def test_nftables_is_installed_enabled_and_running(host):
    assert host.package("nftables").is_installed
    service = host.service("nftables")
    assert service.is_enabled
    assert host.run("systemctl is-active nftables").stdout.strip() == "active"


def test_rules_file_is_root_owned_and_valid(host):
    rules = host.file("/etc/nftables.conf")
    assert rules.user == "root" and rules.group == "root" and rules.mode == 0o644
    assert host.run("nft --check --file /etc/nftables.conf").rc == 0


def test_the_loaded_ruleset_drops_by_default(host):
    ruleset = host.check_output("nft list chain inet appliance_filter input")
    assert "policy drop;" in ruleset
    assert "tcp dport 22 accept" in ruleset
    assert "ip saddr 192.0.2.0/24 tcp dport 8080 accept" in ruleset
    assert "ip6 saddr 2001:db8::/32 tcp dport 8080 accept" in ruleset
    forward = host.check_output("nft list chain inet appliance_filter forward")
    assert "policy drop;" in forward


def test_ssh_is_reachable_from_the_control_machine(address):
    assert _connects(address, 22)


@pytest.mark.usefixtures("listeners")
@pytest.mark.parametrize("port", PROBE_PORTS)
def test_closed_ports_answer_inside_but_not_from_the_control_machine(host, address, port):
    inside = host.run(f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\"")
    assert inside.rc == 0, f"nothing listens on {port} inside the host: the probe proves nothing"
    assert not _connects(address, port), f"port {port} is reachable from the control machine"


def test_sandboxes_are_forwarded_masqueraded_and_kept_off_the_host(host):
    ruleset = host.check_output("nft list ruleset")
    assert 'iifname "aplsb*" drop' in ruleset  # no sandbox reaches the host's own services
    assert 'iifname "aplsb*" ip saddr 100.96.0.0/16 accept' in ruleset
    assert 'ip saddr 100.96.0.0/16 oifname != "aplsb*" masquerade' in ruleset
    assert host.sysctl("net.ipv4.ip_forward") == 1
    assert host.file("/etc/sysctl.d/60-appliance-sandboxes.conf").contains("net.ipv4.ip_forward = 1")
