"""The balancer role's HAProxy (roles/balancer), rendered by ansible-core from the role's defaults, checked by
`haproxy -c`, and run for real on loopback in front of two stand-in nodes (TLS servers with site-CA certificates,
each with a real agent-check port): a call on a sandbox goes to the node its id names, creates follow the agent
checks' weights (none to a draining node), and a node that is down answers 503 node_unavailable naming it."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import site_ca
from service.agent_check import AgentCheckServer
from service.routing import Capacity
from tests.unit.role_render import render
from tests.unit.test_node_proxy import _free_port, _require_haproxy, running_haproxy


@dataclass
class Node:
    name: str
    tag: str
    httpd: http.server.ThreadingHTTPServer
    agent: AgentCheckServer
    draining: bool = False

    def entry(self) -> dict:
        return {"name": self.name, "tag": self.tag, "address": "127.0.0.1", "port": self.httpd.server_address[1],
                "agent_port": self.agent.port}


def _node(ca_dir: Path, name: str, tag: str) -> Node:
    issued = site_ca.issue(ca_dir, name, [name, "127.0.0.1"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = json.dumps({"node": name, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    node = Node(name, tag, httpd, None)  # type: ignore[arg-type]
    node.agent = AgentCheckServer("127.0.0.1", 0, lambda: Capacity(8, 8, 4096.0, 4096.0),
                                  lambda: node.draining).start()
    return node


def write_balancer(directory: Path, nodes: list[dict], port: int = 443) -> Path:
    ca_dir = directory / "ca"
    issued = site_ca.issue(ca_dir, "balancer", ["localhost", "127.0.0.1"])
    pem = directory / "balancer.pem"
    pem.write_text(issued.cert.read_text() + issued.key.read_text())
    errors = directory / "errors"
    errors.mkdir(exist_ok=True)
    given = {"balancer_nodes": nodes, "balancer_tls_pem": str(pem), "balancer_ca_file": str(ca_dir / "ca.pem"),
             "balancer_map": str(directory / "nodes.map"), "balancer_errors_dir": str(errors),
             "balancer_bind_address": "127.0.0.1", "balancer_port": port, "balancer_agent_inter_s": 1}
    for node in nodes:
        (errors / f"node-{node['tag']}-503.http").write_text(
            render("balancer", "etc/haproxy/node-unavailable.http.j2", item=node, **given))
    (directory / "nodes.map").write_text(render("balancer", "etc/haproxy/appliance-nodes.map.j2", **given))
    config = directory / "haproxy.cfg"
    config.write_text(render("balancer", "etc/haproxy/haproxy.cfg.j2", **given))
    return config


def test_the_rendered_configuration_is_valid_for_haproxy(tmp_path: Path):
    _require_haproxy()
    nodes = [{"name": f"node{i}.example.net", "tag": f"n{i}", "address": f"192.0.2.{i}", "port": 8443,
              "agent_port": 8444} for i in (1, 2, 3)]
    config = write_balancer(tmp_path, nodes)
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "nodes.map").read_text().splitlines()[-3:] == [
        "n1 node_n1", "n2 node_n2", "n3 node_n3"]


@dataclass
class Fleet:
    port: int
    nodes: dict[str, Node]
    context: ssl.SSLContext

    def call(self, method: str, path: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=60, context=self.context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    _require_haproxy()
    nodes = {tag: _node(tmp_path / "ca", f"node-{tag}", tag) for tag in ("n1", "n2")}
    port = _free_port()
    config = write_balancer(tmp_path, [node.entry() for node in nodes.values()], port)
    try:
        with running_haproxy(config, port):
            yield Fleet(port, nodes, ssl.create_default_context(cafile=tmp_path / "ca" / "ca.pem"))
    finally:
        for node in nodes.values():
            node.agent.close()
            node.httpd.shutdown()
            node.httpd.server_close()


def _until(condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(0.2)
    return result


def test_a_call_on_a_sandbox_goes_to_the_node_its_id_names(fleet: Fleet):
    for tag in ("n1", "n2", "n1", "n2"):
        status, body = fleet.call("POST", f"/v1/sandboxes/sb-{tag}-0123456789abcdef/exec")
        assert status == 200 and body["node"] == f"node-{tag}", body


def test_creates_follow_the_agent_checks_and_skip_a_draining_node(fleet: Fleet):
    fleet.nodes["n1"].draining = True

    def ten_creates_on_n2() -> bool:
        return all(fleet.call("POST", "/v1/sandboxes")[1]["node"] == "node-n2" for _ in range(10))

    _until(ten_creates_on_n2, "creates still reach the draining node")
    fleet.nodes["n1"].draining = False
    _until(lambda: any(fleet.call("POST", "/v1/sandboxes")[1]["node"] == "node-n1" for _ in range(10)),
           "no create reaches the node after it stopped draining")
    # a draining node still serves the sandboxes it holds
    fleet.nodes["n1"].draining = True
    assert fleet.call("GET", "/v1/sandboxes/sb-n1-0123456789abcdef")[1]["node"] == "node-n1"


def test_a_node_that_is_down_answers_503_node_unavailable_naming_it(fleet: Fleet):
    fleet.nodes["n1"].httpd.shutdown()
    fleet.nodes["n1"].httpd.server_close()
    _, body = _until(lambda: (r := fleet.call("GET", "/v1/sandboxes/sb-n1-0123456789abcdef"))[0] == 503 and r,
                          "no 503 for the down node's sandbox")
    assert body["error"]["code"] == "node_unavailable" and "node-n1" in body["error"]["message"]
    assert fleet.call("GET", "/v1/sandboxes/sb-n2-0123456789abcdef")[1]["node"] == "node-n2"


def test_the_nodes_come_from_the_inventory_group_with_their_tags_and_ports():
    hostvars = {"node1": {"ansible_host": "192.0.2.11", "appliance_api_node_tag": "n1"},
                "node2": {"ansible_host": "192.0.2.12", "appliance_api_node_tag": "n2", "node_proxy_port": 9443,
                          "appliance_api_agent_check_port": 9444}}
    given = {"groups": {"appliance": ["node1", "node2"]}, "hostvars": hostvars}
    config = render("balancer", "etc/haproxy/haproxy.cfg.j2", **given)
    assert "server node1 192.0.2.11:8443 sni str(node1) weight 100 agent-check agent-port 8444" in config
    assert "server node2 192.0.2.12:9443 sni str(node2) weight 100 agent-check agent-port 9444" in config
    assert "backend node_n2\n" in config
    assert render("balancer", "etc/haproxy/appliance-nodes.map.j2", **given).splitlines()[-2:] == [
        "n1 node_n1", "n2 node_n2"]
