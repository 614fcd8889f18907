"""The node's TLS front door as an operator checks it: HAProxy running, the API (gunicorn) on loopback only, the API
answering over HTTPS with a certificate the site CA issued and nothing else trusts, plain HTTP refused, the key
root's alone, JSON errors naming the node when the API is down, and 64 slow clients (headers sent a byte at a time)
not starving the health checks. Everything from the control machine, over the test's own veth link.

The scenario raises the per-client connection limit to 80 (the 64 slow clients all come from this one address) and
cuts unfinished requests after 5 s, so the slow clients are cut by the request timeout while health checks answer.
"""

import json
import os
import select
import socket
import ssl
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from slowclients import SlowClients, timed_health_check

testinfra_hosts = ["all"]

PORT, API_PORT = 8443, 8080
SLOW_CLIENTS = 64
CLIENT_LIMIT = 80  # node_proxy_client_max_connections in molecule.yml
DEADLINE_S = 60  # catches hangs only: the latencies are printed, not asserted


@pytest.fixture(scope="module")
def address(host):
    return host.ansible.get_variables()["ansible_host"]


@pytest.fixture(scope="module")
def ca_dir():
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "site-ca"


@pytest.fixture(scope="module")
def tls(ca_dir):
    return ssl.create_default_context(cafile=ca_dir / "ca.pem")


def _wait_for(condition, what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.5)


def test_haproxy_is_enabled_and_running(host):
    service = host.service("haproxy.service")
    assert service.is_enabled and service.is_running
    assert host.run("haproxy -c -q -f /etc/haproxy/haproxy.cfg").rc == 0


def test_gunicorn_listens_on_loopback_only(host, address):
    assert host.socket(f"tcp://127.0.0.1:{API_PORT}").is_listening
    assert not host.socket(f"tcp://0.0.0.0:{API_PORT}").is_listening
    assert not host.socket(f"tcp://{address}:{API_PORT}").is_listening
    assert 'host = "127.0.0.1"' in host.file("/etc/appliance/appliance.toml").content_string
    with pytest.raises(ConnectionRefusedError):  # and from the network, nothing answers on the API's own port
        socket.create_connection((address, API_PORT), timeout=10).close()


def test_api_answers_over_https_with_the_site_ca_only(address, tls):
    with urllib.request.urlopen(f"https://{address}:{PORT}/v1/healthz", timeout=10, context=tls) as response:
        assert response.status == 200 and json.load(response) == {"status": "ok"}
    # the system's trust store does not know the site CA: the certificate is refused, no request is sent
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"https://{address}:{PORT}/v1/healthz", timeout=10,
                               context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_to_the_public_port_is_refused(address):
    with socket.create_connection((address, PORT), timeout=10) as plain:
        plain.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer[:200]


def test_the_certificate_key_is_roots_alone(host, ca_dir):
    pem = host.file("/etc/haproxy/tls/node.pem")
    assert pem.user == "root" and pem.group == "root" and pem.mode == 0o600
    assert "PRIVATE KEY" in pem.content_string and "CERTIFICATE" in pem.content_string
    assert host.file("/etc/haproxy/tls/site-ca.pem").mode == 0o644
    # the CA's key stays on the control machine, 0600
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in host.file("/etc/haproxy/tls/site-ca.pem").content_string


def test_64_slow_clients_do_not_starve_health_checks(address, tls):
    """The slow clients hold 64 TLS connections and drip their headers; health checks on fresh connections keep
    answering, and HAProxy cuts every slow client once its request timeout passes (none ever reaches the API)."""
    clients = SlowClients(address, PORT, tls, SLOW_CLIENTS)
    clients.start()
    latencies = []
    try:
        clients.wait_connected(SLOW_CLIENTS, DEADLINE_S)
        assert clients.connected == SLOW_CLIENTS, f"only {clients.connected} slow clients got in"
        # checks until the server cut them all (the request timeout is 5 s here): before, during and after
        started = time.monotonic()
        while clients.cut_by_server < SLOW_CLIENTS:
            status, seconds = timed_health_check(f"https://{address}:{PORT}/v1/healthz", tls, DEADLINE_S)
            assert status == 200
            latencies.append(seconds)
            assert time.monotonic() - started < DEADLINE_S, f"slow clients still open: {clients.cut_by_server} cut"
            time.sleep(0.2)
    finally:
        clients.stop()
    print(f"healthz through HAProxy with {SLOW_CLIENTS} slow clients: {len(latencies)} checks, "
          f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 3


def test_one_client_address_holds_at_most_the_limit(address, tls):
    """90 connections from one address: HAProxy closes the 10 over the limit at once; the other 80 stay open,
    waiting for their TLS handshake (a closed socket turns readable, an open one does not)."""
    held: list[socket.socket] = []
    try:
        for _ in range(CLIENT_LIMIT + 10):
            held.append(socket.create_connection((address, PORT), timeout=10))
        _wait_for(lambda: len(select.select(held, [], [], 0)[0]) >= 10, "10 connections over the limit not closed")
        # the previous test's last connections may still count for a moment: a few more may be refused, never
        # fewer (no limit) and never most (a much lower limit)
        closed = len(select.select(held, [], [], 0)[0])
        assert 10 <= closed <= 13, closed
    finally:
        for conn in held:
            conn.close()
    # once they are closed, the address is served again
    _wait_for(lambda: timed_health_check(f"https://{address}:{PORT}/v1/healthz", tls)[0] == 200,
              "healthz after the connections closed")


def test_a_stopped_api_answers_503_node_unavailable_naming_the_node(host, address, tls):
    def through_proxy() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"https://{address}:{PORT}/v1/healthz", timeout=10, context=tls) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    host.run("systemctl stop appliance-api.service")
    try:
        _, body = _wait_for(lambda: (r := through_proxy())[0] == 503 and r, "no 503 with the API stopped")
        assert body["error"]["code"] == "node_unavailable"
        assert host.ansible.get_variables()["inventory_hostname"] in body["error"]["message"]
    finally:
        host.run("systemctl start appliance-api.service")
    _wait_for(lambda: through_proxy()[0] == 200, "healthz after the API started again")
