"""The whole node, end to end, from the control machine: create a sandbox over the network, run code in it, get the
right answer back; a sandbox with an allow-list reaches what it names and nothing else, shown by traffic; the
firewall lets exactly the API through; and a sandbox created before an upgrade (side_effect runs upgrade.yml with a
new release) still has its state after it. Sandboxes run under TCG here (no usable KVM).

The site scenario needs a bootable guest image in the test bundle (the pytest runner refuses to start it without
one): with a stand-in image the checks that boot sandboxes fail, they are never skipped, since they are the point."""

import errno
import json
import os
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest

testinfra_hosts = ["all"]

KEY = "molecule-test-key-0123456789"
# Through the node's HAProxy, over TLS, trusting the site CA the node_proxy role made (gunicorn is on loopback only).
PORT = 8443
TLS = ssl.create_default_context(cafile=Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "site-ca" / "ca.pem")


def _call(address: str, method: str, path: str, body: dict | None = None, timeout: float = 180) -> tuple[int, dict]:
    request = urllib.request.Request(f"https://{address}:{PORT}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode())
    request.add_header("Authorization", f"Bearer {KEY}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=TLS) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def address(host):
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def bootable_image():
    manifest = json.loads((Path(os.environ["APPLIANCE_TEST_BUNDLE_DIR"]) / "manifest.json").read_text())
    image = Path(os.environ["APPLIANCE_TEST_BUNDLE_DIR"]) / "images" / manifest["image_id"] / "manifest.json"
    if json.loads(image.read_text()).get("stand_in"):
        pytest.fail("the test bundle holds a stand-in guest image that cannot boot (run `appliance build guest` "
                    "first)")


def test_every_part_is_running(host):
    for unit in ("appliance-api.service", "haproxy.service", "nftables.service", "run-appliance.mount"):
        assert host.service(unit).is_enabled, unit
        assert host.run(f"systemctl is-active {unit}").stdout.strip() == "active", unit
    assert host.file("/var/lib/appliance-images/current").is_symlink
    assert host.check_output("ip route show default") == ""


def _wait_ready(address: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _ = _call(address, "GET", "/v1/readyz", timeout=10)
        if status == 200:
            return
        time.sleep(2)
    pytest.fail(f"/v1/readyz did not answer 200 within {timeout_s:.0f}s")


@pytest.mark.usefixtures("bootable_image")
def test_create_a_sandbox_and_run_code_over_the_network(host, address):
    _wait_ready(address)
    status, sandbox = _call(address, "POST", "/v1/sandboxes", {})
    assert status == 201, sandbox
    try:
        status, result = _call(address, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                               {"code": "import sys\nprint(6 * 7)\nsys.version_info[:2]"})
        assert status == 200, result
        assert result["stdout"] == "42\n"
        assert result["error"] is None
        assert result["text"] == "(3, 11)"
        # The API is unprivileged: the root launcher started this VM, jailed, as the VM user.
        pids = host.check_output("pgrep -u appliance-vm -x qemu-system-x86").split()
        assert pids, "no QEMU runs as the VM user"
        for pid in pids:
            status = host.file(f"/proc/{pid}/status").content_string
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            assert int(fields["CapEff"], 16) == 0 and fields["Seccomp"].strip() == "2"
    finally:
        _call(address, "DELETE", f"/v1/sandboxes/{sandbox['id']}")


class Listener:
    """A TCP server on this (the control) machine's end of the node's veth link: answers one line naming its port to
    each connection and remembers who connected."""

    def __init__(self, address: str) -> None:
        self.socket = socket.create_server((address, 0))
        self.socket.settimeout(0.5)
        self.port = self.socket.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, peer = self.socket.accept()
            except TimeoutError:
                continue
            with connection:
                self.peers.append(peer[0])
                connection.sendall(f"hello from port {self.port}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close()


# Each probe returns the first line the server sent, or how the connection failed. The 60 s timeout only catches a
# silent drop (a hang): what the policy denies must be rejected at once, which shows as the errno, not as a time.
PROBE = """
import socket
def probe(address, port):
    try:
        with socket.create_connection((address, port), timeout=60) as s:
            return s.recv(100).decode().strip()
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return f"failed errno {exc.errno}"
"""
REJECTED = {f"failed errno {errno.ECONNREFUSED}", f"failed errno {errno.EHOSTUNREACH}"}


@pytest.fixture
def control_address(address):
    """This machine's address on the node's link (the source address the kernel picks to reach the node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))  # a UDP connect sends nothing: it only picks the route and source address
        return probe.getsockname()[0]


@pytest.mark.usefixtures("bootable_image")
def test_an_allow_list_lets_through_by_traffic_what_it_names_and_rejects_the_rest_at_once(address, control_address):
    allowed, other = Listener(control_address), Listener(control_address)
    try:
        policy = {"egress": {"allow": [f"{control_address}:{allowed.port}"]}}
        status, sandbox = _call(address, "POST", "/v1/sandboxes", {"network": policy})
        assert status == 201, sandbox
        try:
            assert sandbox["network"]["egress"] == policy["egress"]
            targets = [(control_address, allowed.port), (control_address, other.port), (address, PORT),
                       (address, 22)]
            status, result = _call(address, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                                   {"code": PROBE + f"[probe(a, p) for a, p in {targets!r}]", "timeout_s": 300},
                                   timeout=360)
            assert status == 200 and result["error"] is None, result
            through, other_port, api, ssh = eval(result["text"])  # a list of str, repr'd by the guest
            assert through == f"hello from port {allowed.port}"
            assert allowed.peers == [address]  # it left the node masqueraded behind the node's own address
            # another port of the same host (a server listens there), the node's API and SSH: rejected at once
            assert {other_port, api, ssh} <= REJECTED, (other_port, api, ssh)
            assert other.peers == []
        finally:
            _call(address, "DELETE", f"/v1/sandboxes/{sandbox['id']}")
    finally:
        allowed.close()
        other.close()


def test_api_is_open_to_the_control_machine_and_other_ports_are_not(host, address):
    with urllib.request.urlopen(f"https://{address}:{PORT}/v1/healthz", timeout=10, context=TLS) as response:
        assert response.status == 200
    with pytest.raises(OSError):  # the API's own port is loopback's alone
        socket.create_connection((address, 8080), timeout=2).close()
    host.check_output("systemd-run --unit=probe-9999 --collect python3 -m http.server --bind 0.0.0.0 9999")
    try:
        deadline = time.monotonic() + 10
        while "0.0.0.0:9999" not in host.check_output("ss -Htln") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert host.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 9999), 2)\"").rc == 0
        with pytest.raises(OSError):
            socket.create_connection((address, 9999), timeout=2).close()
    finally:
        host.run("systemctl stop probe-9999")


@pytest.mark.usefixtures("bootable_image")
def test_a_sandbox_keeps_its_state_through_the_upgrade(host, address):
    sandbox_id = (Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "upgrade-sandbox-id").read_text().strip()
    status, result = _call(address, "POST", f"/v1/sandboxes/{sandbox_id}/exec", {"code": "x + 1"})
    assert status == 200, result
    assert result["text"] == "42"
    _call(address, "DELETE", f"/v1/sandboxes/{sandbox_id}")


def test_the_upgrade_switched_releases_and_kept_the_previous_one(host):
    current = host.file("/opt/appliance/venv").linked_to
    previous = host.file("/opt/appliance/previous")
    assert previous.is_symlink and host.file(previous.linked_to + "/venv/bin/appliance").is_file
    assert not current.startswith(previous.linked_to + "/")
    assert len(host.check_output("ls /opt/appliance/releases").split()) == 2
