"""`appliance doctor`'s check of the node's TLS front door: the findings (pure) and the probe, against a real TLS
server on loopback with a certificate from a site CA."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from appliance import doctor_checks, site_ca
from appliance.doctor_checks import ProxyProbe, proxy_findings


def _levels(findings) -> dict[str, str]:
    return {f.subject: f.level for f in findings}


def test_a_healthy_proxy_with_a_fresh_certificate_is_ok():
    assert _levels(proxy_findings("127.0.0.1", 8443, ProxyProbe(200, 300.0))) == {
        "tls proxy": "ok", "tls certificate": "ok"}


def test_an_api_facing_the_network_is_a_warning_with_or_without_a_proxy():
    assert _levels(proxy_findings("0.0.0.0", None, None)) == {"api address": "warn"}
    assert _levels(proxy_findings("0.0.0.0", 8443, ProxyProbe(200, 300.0)))["api address"] == "warn"
    assert proxy_findings("127.0.0.1", None, None) == []  # a developer's machine: nothing to say


def test_a_silent_proxy_a_failing_api_and_an_ending_certificate_are_warnings():
    silent = proxy_findings("127.0.0.1", 8443, ProxyProbe(error="no TLS answer (refused)"))
    assert _levels(silent) == {"tls proxy": "warn"} and "refused" in silent[0].detail
    assert _levels(proxy_findings("127.0.0.1", 8443, ProxyProbe(503, 300.0)))["tls proxy"] == "warn"
    ending = proxy_findings("127.0.0.1", 8443, ProxyProbe(200, 12.0))
    assert _levels(ending)["tls certificate"] == "warn" and "12 days" in ending[1].detail
    # warnings, not failures: the node can still run sandboxes
    assert doctor_checks.can_run_sandboxes(silent + ending)


def _serve_once(listener: socket.socket, context: ssl.SSLContext, answer: bytes) -> threading.Thread:
    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as stream:
                stream.recv(4096)
                stream.sendall(answer)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_the_probe_reads_the_status_and_the_certificates_end_through_the_site_ca(tmp_path: Path):
    issued = site_ca.issue(tmp_path, "n1", ["localhost"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(issued.cert, issued.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = _serve_once(listener, server, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        probe = doctor_checks.probe_proxy(port, ca_file=tmp_path / "ca.pem")
        thread.join(timeout=30)
        assert probe.status == 200 and probe.error == ""
        assert site_ca.NODE_DAYS - 2 < probe.cert_days_left <= site_ca.NODE_DAYS
        # another CA's trust: the certificate is refused and the probe says so
        other = tmp_path / "other"
        site_ca.ensure_ca(other)
        thread = _serve_once(listener, server, b"HTTP/1.1 200 OK\r\n\r\n")
        refused = doctor_checks.probe_proxy(port, ca_file=other / "ca.pem")
        thread.join(timeout=30)
        assert refused.status is None and "certificate not trusted" in refused.error
