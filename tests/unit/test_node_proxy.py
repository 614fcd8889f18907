"""The node_proxy role's HAProxy configuration and JSON error pages, rendered by ansible-core's own templating from
the role's defaults, checked by `haproxy -c`, and run for real on loopback in front of a small HTTP server: TLS
only, forwarding headers from HAProxy and never from the client, and 503 node_unavailable as the API's JSON error
when the API is down. (On a node, with the real API and 64 slow clients: molecule/appliance_api/tests.)"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import site_ca
from tests.unit.role_render import render, role_variables

CONFIG = "etc/haproxy/haproxy.cfg.j2"
ERROR_PAGE = "etc/haproxy/errors/error.http.j2"
NODE = "node1.example.net"


def _require_haproxy() -> None:
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: make setup (appliance/host_tools.py lists it for the tests)")


# Lines of a node's HAProxy configuration that need the node's unit (chroot, users, syslog): left out here.
NODE_ONLY = ("chroot ", "user ", "group ", "stats socket", "log /dev/log")


@contextmanager
def running_haproxy(config: Path, port: int) -> Iterator[None]:
    """HAProxy on `config` (less the NODE_ONLY lines) until it listens on `port`; stopped by its PID at the end."""
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.strip().startswith(NODE_ONLY)))
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"haproxy did not listen: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_site(directory: Path, **overrides: object) -> Path:
    """The rendered configuration, its error pages and a certificate from a site CA, all under `directory`, as
    the role lays them out on a node; returns the configuration's path."""
    issued = site_ca.issue(directory / "ca", "local", ["localhost", "127.0.0.1"])
    pem = directory / "node.pem"
    pem.write_text(issued.cert.read_text() + issued.key.read_text())
    errors = directory / "errors"
    errors.mkdir()
    given = {"inventory_hostname": NODE, "node_proxy_tls_pem": str(pem), "node_proxy_errors_dir": str(errors),
             **overrides}
    for error in role_variables("node_proxy")["node_proxy_errors"]:
        (errors / f"{error['status']}.http").write_text(render("node_proxy", ERROR_PAGE, item=error, **given))
    config = directory / "haproxy.cfg"
    config.write_text(render("node_proxy", CONFIG, **given))
    return config


def test_the_rendered_configuration_is_valid_for_haproxy(tmp_path: Path):
    config = write_site(tmp_path)
    _require_haproxy()
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_api_is_reached_on_loopback_with_timeouts_and_a_per_client_limit(tmp_path: Path):
    text = write_site(tmp_path, node_proxy_client_max_connections=7, node_proxy_timeout_http_request_s=4).read_text()
    assert "server api 127.0.0.1:8080 check" in text
    assert "bind 0.0.0.0:8443 ssl crt" in text
    assert "timeout http-request 4s" in text and "option http-buffer-request" in text
    assert "tcp-request connection reject if { sc0_conn_cur gt 7 }" in text
    # what the client sent is dropped before HAProxy adds its own
    assert text.index("http-request del-header X-Forwarded-For") < text.index("option forwardfor")


def test_a_missing_variable_is_an_error_not_an_empty_string():
    from ansible.errors import AnsibleUndefinedVariable

    with pytest.raises(AnsibleUndefinedVariable):
        render("node_proxy", ERROR_PAGE, item={"status": 503, "reason": "x", "code": "x", "message": "x"})


@pytest.mark.parametrize("error", role_variables("node_proxy")["node_proxy_errors"], ids=lambda e: str(e["status"]))
def test_each_error_page_is_http_with_the_apis_json_error_naming_the_node(error):
    page = render("node_proxy", ERROR_PAGE, item=error, inventory_hostname=NODE)
    head, _, body = page.partition("\n\n")
    assert head.splitlines()[0] == f"HTTP/1.1 {error['status']} {error['reason']}"
    assert "Content-Type: application/json" in head
    assert ("Retry-After: 5" in head) == (error["status"] == 503)
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and parsed["error"]["code"] == error["code"]
    assert parsed["error"]["message"].startswith(f"node {NODE}: ")


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the forwarding headers it was given."""

    def do_GET(self) -> None:
        body = json.dumps({name: self.headers.get(name) for name in ("X-Forwarded-For", "X-Forwarded-Proto")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Proxy:
    port: int
    backend: http.server.ThreadingHTTPServer
    context: ssl.SSLContext

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    """HAProxy from the rendered configuration (less the chroot, user and syslog lines a node's unit needs) in
    front of an echo server; both stopped by PID at the end."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = _free_port()
    config = write_site(tmp_path, node_proxy_bind_address="127.0.0.1", node_proxy_port=port,
                        node_proxy_backend_port=backend.server_address[1])
    _require_haproxy()
    try:
        with running_haproxy(config, port):
            yield Proxy(port, backend, ssl.create_default_context(cafile=tmp_path / "ca" / "ca.pem"))
    finally:
        backend.shutdown()
        backend.server_close()


def test_haproxy_speaks_tls_only_and_sets_the_forwarding_headers_itself(proxy: Proxy):
    status, seen = proxy.get("/v1/healthz", {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"})
    assert status == 200
    assert seen == {"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Proto": "https"}  # the client's claims dropped
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as plain:
        plain.sendall(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = plain.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/")


def test_a_down_api_is_503_node_unavailable_in_the_apis_error_shape(proxy: Proxy):
    proxy.backend.shutdown()
    proxy.backend.server_close()
    status, body = proxy.get("/v1/sandboxes/sb-1")
    assert status == 503
    assert body["error"]["code"] == "node_unavailable" and NODE in body["error"]["message"]
