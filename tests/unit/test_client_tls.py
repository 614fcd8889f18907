"""The SDK over https (appliance/client/tls.py): it verifies the server's certificate, trusts a site CA given in
APPLIANCE_CA_BUNDLE, and with APPLIANCE_TLS_PIN refuses a certificate that matches no pin before any request (and
so the API key) is sent. Against a real TLS server on loopback with a certificate from a site CA."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import site_ca
from appliance.client import tls
from appliance.client.errors import ApplianceError
from appliance.client.sandbox import _Api


@dataclass
class Server:
    url: str
    ca_file: Path
    cert_der: bytes
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.delenv(tls.CA_BUNDLE_ENV, raising=False)
    monkeypatch.delenv(tls.PIN_ENV, raising=False)
    issued = site_ca.issue(tmp_path / "ca", "local", ["localhost", "127.0.0.1"])
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    der = x509.load_pem_x509_certificate(issued.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    try:
        yield Server(f"https://127.0.0.1:{httpd.server_address[1]}", tmp_path / "ca" / "ca.pem", der, seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=30)


def _get(server: Server) -> int:
    api = _Api(server.url, "test-key-0123456789abcdef", None, 30)
    try:
        return api.http.get("/v1/healthz", headers=api.headers).status_code
    finally:
        api.http.close()


def test_a_certificate_from_an_unknown_ca_is_refused(server: Server):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(server)
    assert server.requests == []


def test_the_site_ca_from_appliance_ca_bundle_is_trusted(server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(tls.CA_BUNDLE_ENV, str(server.ca_file))
    assert _get(server) == 200
    assert server.requests == ["/v1/healthz Bearer test-key-0123456789abcdef"]


def test_a_matching_pin_of_either_form_is_accepted(server: Server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(tls.CA_BUNDLE_ENV, str(server.ca_file))
    fingerprint = ":".join(f"{b:02X}" for b in hashlib.sha256(server.cert_der).digest())  # as openssl prints it
    monkeypatch.setenv(tls.PIN_ENV, fingerprint)
    assert _get(server) == 200
    spki = base64.b64encode(tls.spki_sha256(server.cert_der)).decode()
    monkeypatch.setenv(tls.PIN_ENV, f"sha256//{'A' * 43}=, sha256//{spki}")  # one of several pins matches
    assert _get(server) == 200


def test_a_certificate_matching_no_pin_is_refused_before_the_key_is_sent(server: Server,
                                                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(tls.CA_BUNDLE_ENV, str(server.ca_file))  # trusted by the CA, but not the pinned one
    monkeypatch.setenv(tls.PIN_ENV, "sha256//" + base64.b64encode(b"\x01" * 32).decode())
    with pytest.raises(httpx.ConnectError, match="APPLIANCE_TLS_PIN"):
        _get(server)
    assert server.requests == []


@pytest.mark.parametrize("pin", ["sha256//not-base64", "abcd", "sha1//AAAA"])
def test_a_malformed_pin_is_an_error_not_ignored(server: Server, monkeypatch: pytest.MonkeyPatch, pin: str):
    monkeypatch.setenv(tls.PIN_ENV, pin)
    with pytest.raises(ApplianceError) as error:
        _get(server)
    assert error.value.code == "tls_settings"


def test_plain_http_urls_need_no_tls_settings(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(tls.PIN_ENV, "not a pin")
    assert tls.httpx_verify("http://127.0.0.1:8080") is True
