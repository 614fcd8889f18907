"""Sandbox networks for real: a test server in a network namespace this module creates, sandboxes with and
without a policy (from the pool, forked, frozen and resumed), and what reaches what.

Addresses: the servers live in 198.18.7.0/24 (a benchmarking range no real network uses, so not public: the
module's service opts it in with service.egress_private_allow); the host's end of the test link is 198.18.7.1 and
also runs a server, which no sandbox may reach (it is the host itself, opted in or not). Behind the same link the
namespace also serves at a private address (10.254.7.2), at the cloud metadata address (169.254.169.254) and at
a public one (192.88.99.7, the retired 6to4 relay range): the host routes each of them into that link only, so
none of this traffic could leave the machine even if the filter let it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from service.engine import network
from service.engine.netpolicy import NETNS_PREFIX
from service.errors import Invalid, ServiceError
from service.manager import SandboxManager
from service.pool import PoolKeeper
from service.registry import POOLED
from tests.configs import service_config

pytestmark = pytest.mark.integration
OWNER = "net-owner"
HOST_END, ALLOWED, DENIED = "198.18.7.1", "198.18.7.2", "198.18.7.3"
PRIVATE, METADATA, PUBLIC = "10.254.7.2", "169.254.169.254", "192.88.99.7"
OPTED_IN = ["198.18.7.0/24"]  # the module's service.egress_private_allow
PORT, OTHER_PORT = 8000, 8001
# How a guest's connect fails: with no interface but loopback there is no route at all; what a policy denies, the
# sandbox's namespace rejects at once with ICMP admin-prohibited (docs/security.md), which connect() reports so.
NO_ROUTE_AT_ALL = "failed: OSError [Errno 101] Network is unreachable"
REJECTED = "failed: OSError [Errno 113] No route to host"

# Each server answers one line naming its address and port, then closes.
SERVER = """
import socket, sys, threading
def serve(address, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((address, port)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(f"hello from {address}:{port}\\n".encode()); c.close()
pairs = [(a, int(p)) for a, p in (x.split(":") for x in sys.argv[1:])]
for a, p in pairs[1:]:
    threading.Thread(target=serve, args=(a, p), daemon=True).start()
serve(*pairs[0])
"""

CONNECT = """
import socket
def probe(address, port):
    try:
        with socket.create_connection((address, port), timeout=5) as s:
            return s.recv(100).decode().strip()
    except OSError as exc:
        return f"failed: {type(exc).__name__} {exc}"
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def hello(address: str, port: int) -> str:
    return f"hello from {address}:{port}"


def answer_to_host(address: str, port: int) -> str:
    """What the server at address:port says to the host, over the test link sandbox traffic is forwarded to: the
    positive control before a probe that must fail (which then cannot pass just because no server is there)."""
    with socket.create_connection((address, port), timeout=5) as connection:
        return connection.recv(100).decode().strip()


def wait_until_serving(endpoints: list[tuple[str, int]], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 60  # a hang deadline: the servers listen within a second
    for address, port in endpoints:
        while True:
            try:
                if answer_to_host(address, port) == hello(address, port):
                    break
            except OSError:
                pass
            assert all(process.poll() is None for process in processes), "a test server exited"
            assert time.monotonic() < deadline, f"no server answered at {address}:{port} within 60 s"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def servers():
    """A namespace with two server addresses behind a veth to the host, plus a server on the host's end."""
    why = network.unavailable()
    if why is not None and os.geteuid() != 0:
        pytest.skip(why)
    assert why is None, why  # as root, a missing program is the setup's fault (make test installs nftables)
    tag = secrets.token_hex(3)
    ns, host_if = f"apltest-{tag}", f"apltst{tag}"
    sh("ip", "netns", "add", ns)
    processes: list[subprocess.Popen] = []
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{HOST_END}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        # Replies to sandboxes come in here and are forwarded to them: this link only, not the whole host.
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        for address in (ALLOWED, DENIED):
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        for address in (PRIVATE, METADATA, PUBLIC):  # each behind this link only, by a host route of its own
            sh("ip", "-n", ns, "addr", "add", f"{address}/32", "dev", "eth0")
            sh("ip", "route", "add", f"{address}/32", "dev", host_if)
            route = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True, check=True)
            assert f"dev {host_if} " in route.stdout, route.stdout  # never towards a real network
        endpoints = [(a, p) for a in (ALLOWED, DENIED) for p in (PORT, OTHER_PORT)]
        endpoints += [(address, PORT) for address in (PRIVATE, METADATA, PUBLIC)]
        processes.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER,
                                           *(f"{a}:{p}" for a, p in endpoints)]))
        processes.append(subprocess.Popen([sys.executable, "-c", SERVER, f"{HOST_END}:{PORT}"]))
        wait_until_serving([*endpoints, (HOST_END, PORT)], processes)
        yield ns
    finally:
        for process in processes:  # ours, by PID
            process.kill()
            process.wait()
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True)  # its routes go with it
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


@pytest.fixture(scope="module")
def manager(spec, image_dir, run_root, tmp_path_factory, servers):
    # User code as root in the guest (the deployment opt-in): the policy must hold against the strongest guest,
    # one that can change its own address and routes.
    config = service_config(
        image_dir, guest={"memory_mib": 512}, engine={"code_user": "root"},
        paths={"run_dir": run_root / "net", "state_dir": tmp_path_factory.mktemp("netstate")},
        service={"pool_size": 1, "max_sandboxes_per_key": 8, "max_sandboxes": 10, "workers": 1,
                 "egress_private_allow": OPTED_IN},
    )
    keeper = PoolKeeper(config)
    thread = threading.Thread(target=keeper.run, daemon=True)
    thread.start()
    manager = SandboxManager(config)
    deadline = time.monotonic() + 300
    while manager.readiness() is not None or not manager.registry.count(states=(POOLED,)):
        assert thread.is_alive() and time.monotonic() < deadline, "no pooled sandbox within 300 s"
        thread.join(0.5)
    yield manager
    for record in manager.registry.list(owner=OWNER):
        manager._destroy(record)
    keeper.stop()
    thread.join(60)
    manager.close()


def probes(manager: SandboxManager, sandbox_id: str, *targets: tuple[str, int]) -> list[str]:
    code = CONNECT + f"[probe(a, p) for a, p in {list(targets)!r}]"
    result = manager.exec(OWNER, sandbox_id, code)
    assert result.ok, result.error
    return eval(result.text)  # a list of str repr'd by the guest


def guest_interfaces(manager: SandboxManager, sandbox_id: str) -> list[str]:
    result = manager.exec(OWNER, sandbox_id, "import os; sorted(os.listdir('/sys/class/net'))")
    return eval(result.text)


def our_namespaces() -> set[str]:
    return {name for name in os.listdir("/run/netns") if name.startswith(NETNS_PREFIX)}


def test_a_sandbox_without_a_policy_has_only_loopback(manager):
    before = our_namespaces()
    record = manager.create(OWNER)
    assert record.network is None
    assert guest_interfaces(manager, record.id) == ["lo"]
    assert answer_to_host(ALLOWED, PORT) == hello(ALLOWED, PORT)
    assert probes(manager, record.id, (ALLOWED, PORT)) == [NO_ROUTE_AT_ALL]
    assert our_namespaces() == before  # nothing was made on the host for it
    manager.delete(OWNER, record.id)


def test_allow_list_lets_through_what_it_names_and_nothing_else(manager):
    record = manager.create(OWNER, network_policy={"egress": {"allow": [f"{ALLOWED}:{PORT}"]}})
    assert record.network["egress"] == {"allow": [f"{ALLOWED}:{PORT}"]}
    assert guest_interfaces(manager, record.id) == ["eth0", "lo"]
    allowed, other_port, denied, host, loopback = probes(
        manager, record.id, (ALLOWED, PORT), (ALLOWED, OTHER_PORT), (DENIED, PORT), (HOST_END, PORT),
        ("127.0.0.1", 22),
    )
    assert allowed == f"hello from {ALLOWED}:{PORT}"
    assert (other_port, denied, host) == (REJECTED, REJECTED, REJECTED)
    assert loopback == "failed: ConnectionRefusedError [Errno 111] Connection refused"  # the guest's own port 22
    namespace = f"{NETNS_PREFIX}{_slot_of(record)}"
    assert namespace in our_namespaces()
    manager.delete(OWNER, record.id)
    assert namespace not in our_namespaces()  # closing a sandbox removes its namespace, links and rules


def test_egress_all_reaches_the_public_internet_but_not_private_ranges_metadata_or_the_host(manager):
    record = manager.create(OWNER, network_policy={"egress": "all"})
    for address in (PUBLIC, PRIVATE, METADATA, HOST_END):  # a server answers at each: a refusal is the filter's
        assert answer_to_host(address, PORT) == hello(address, PORT)
    public, private, metadata, host, opted_in, opted_in_too = probes(
        manager, record.id, (PUBLIC, PORT), (PRIVATE, PORT), (METADATA, PORT), (HOST_END, PORT), (ALLOWED, OTHER_PORT),
        (DENIED, PORT))
    assert public == hello(PUBLIC, PORT)
    assert (private, metadata) == (REJECTED, REJECTED)
    assert host == REJECTED  # the host's own address, though in an opted-in range
    assert (opted_in, opted_in_too) == (hello(ALLOWED, OTHER_PORT), hello(DENIED, PORT))
    manager.delete(OWNER, record.id)


def test_the_operator_can_opt_private_ranges_in_but_never_the_host(manager, monkeypatch):
    wider = replace(manager.config.network, private_allow=(*OPTED_IN, "10.254.7.0/24", f"{METADATA}/32"))
    monkeypatch.setattr(manager, "config", replace(manager.config, network=wider))
    record = manager.create(OWNER, network_policy={"egress": "all"})
    assert probes(manager, record.id, (PRIVATE, PORT), (METADATA, PORT), (HOST_END, PORT)) == [
        hello(PRIVATE, PORT), hello(METADATA, PORT), REJECTED]
    named = manager.create(OWNER, network_policy={"egress": {"allow": [f"{METADATA}:{PORT}"]}})
    assert probes(manager, named.id, (METADATA, PORT), (PRIVATE, PORT)) == [hello(METADATA, PORT), REJECTED]
    for sandbox in (record, named):
        manager.delete(OWNER, sandbox.id)


def test_egress_none_has_an_interface_that_reaches_nothing(manager):
    record = manager.create(OWNER, network_policy={"egress": "none"})
    assert guest_interfaces(manager, record.id) == ["eth0", "lo"]
    assert answer_to_host(ALLOWED, PORT) == hello(ALLOWED, PORT)
    assert probes(manager, record.id, (ALLOWED, PORT)) == [REJECTED]
    manager.delete(OWNER, record.id)


def test_user_code_cannot_widen_its_policy_by_changing_its_address(manager):
    record = manager.create(OWNER, network_policy={"egress": {"allow": [f"{ALLOWED}/32"]}})
    other = manager.create(OWNER, network_policy={"egress": "all"})
    spoof = (f"import subprocess; subprocess.run('ip addr flush dev eth0; ip addr add {other.network['address']}/30 "
             f"dev eth0', shell=True, check=True)")
    assert probes(manager, other.id, (DENIED, PORT)) == [hello(DENIED, PORT)]  # what the stolen address may reach
    assert manager.exec(OWNER, record.id, spoof).ok
    assert probes(manager, record.id, (DENIED, PORT))[0].startswith("failed")
    for sandbox in (record, other):
        manager.delete(OWNER, sandbox.id)


def test_fork_clones_keep_the_policy_with_their_own_identity(manager):
    parent = manager.create(OWNER, network_policy={"egress": {"allow": [f"{ALLOWED}:{PORT}"]}})
    clones = manager.fork(OWNER, parent.id, 2)
    identities = [(r.network["mac"], r.network["address"]) for r in [parent, *clones]]
    assert len({mac for mac, _ in identities}) == 3 and len({ip for _, ip in identities}) == 3
    for clone in clones:
        assert clone.network["egress"] == parent.network["egress"]
        # What QEMU's NIC itself filters on is the clone's new MAC, not a copy of the parent's.
        vm = manager._attach(manager.get(OWNER, clone.id)).vm
        assert network.nic_mac(vm) == clone.network["mac"]
        allowed, denied = probes(manager, clone.id, (ALLOWED, PORT), (DENIED, PORT))
        assert (allowed, denied) == (hello(ALLOWED, PORT), REJECTED)
    for record in [parent, *clones]:
        manager.delete(OWNER, record.id)


def test_freeze_and_resume_keep_the_policy_and_give_a_new_identity(manager):
    record = manager.create(OWNER, network_policy={"egress": {"allow": [f"{ALLOWED}:{PORT}"]}})
    namespace = f"{NETNS_PREFIX}{_slot_of(record)}"
    manager.freeze(OWNER, record.id)
    assert namespace not in our_namespaces()  # a frozen sandbox holds no network on the host
    resumed = manager.resume(OWNER, record.id)
    assert resumed.network["egress"] == record.network["egress"]
    assert resumed.network["mac"] != record.network["mac"]
    allowed, denied = probes(manager, record.id, (ALLOWED, PORT), (DENIED, PORT))
    assert (allowed, denied) == (hello(ALLOWED, PORT), REJECTED)
    manager.delete(OWNER, record.id)


def test_bad_policies_are_refused_before_anything_is_made(manager):
    before = (our_namespaces(), manager.registry.count(OWNER))
    for policy, words in [
        ({"egress": "some"}, "must be"),
        ({"egress": {"allow": []}}, "1 to"),
        ({"egress": {"allow": ["10.0.0.0/8:99999"]}}, "port"),
        ({"egress": {"allow": ["no-such-host.invalid"]}}, "cannot resolve"),
        ({"egress": {"allow": [f"{METADATA}:80"]}}, "not on the public internet"),
        ({"egress": {"allow": [f"{PRIVATE}/32"]}}, "service.egress_private_allow"),
        ({"egress": {"allow": ["localhost:80"]}}, "'localhost' resolves to 127.0.0.1, which is not on the public"),
    ]:
        with pytest.raises(Invalid, match=words):
            manager.create(OWNER, network_policy=policy)
    assert (our_namespaces(), manager.registry.count(OWNER)) == before


def _slot_of(record) -> int:
    return json.loads((Path(record.vm_dir) / network.NETWORK_FILE).read_text())["slot"]


def test_the_keeper_removes_a_network_left_behind_by_a_crash(manager):
    """A service killed between claiming a slot and recording it leaves a namespace: the keeper's reaper finds it
    through the service's own slot markers (never another service's) and removes it."""
    record = manager.create(OWNER, network_policy={"egress": "none"})
    vm_dir = Path(record.vm_dir)
    namespace = f"{NETNS_PREFIX}{_slot_of(record)}"
    (vm_dir / network.NETWORK_FILE).rename(vm_dir / "network.json.hidden")  # as if the crash came before it
    manager.delete(OWNER, record.id)  # the VM goes; without its record, its stop cannot find the namespace
    assert namespace in our_namespaces()
    assert network.remove_leftovers(manager.config.sandboxes_dir, min_age_s=0) == [namespace]
    assert namespace not in our_namespaces()


def test_a_fork_whose_copy_cannot_get_its_network_changes_nothing(manager, monkeypatch):
    parent = manager.create(OWNER, network_policy={"egress": {"allow": [f"{ALLOWED}:{PORT}"]}})
    before = (our_namespaces(), {r.id for r in manager.registry.list(owner=OWNER)})
    real = network.attach_host
    calls = []

    def fails_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise network.NetworkError("injected: no address slot left")
        return real(*args, **kwargs)

    monkeypatch.setattr(network, "attach_host", fails_second_time)
    with pytest.raises(ServiceError, match=r"fork of \S+ failed; it keeps running unchanged: injected"):
        manager.fork(OWNER, parent.id, 2)
    monkeypatch.undo()
    assert (our_namespaces(), {r.id for r in manager.registry.list(owner=OWNER)}) == before
    allowed, denied = probes(manager, parent.id, (ALLOWED, PORT), (DENIED, PORT))  # its link came back up
    assert (allowed, denied) == (hello(ALLOWED, PORT), REJECTED)
    manager.delete(OWNER, parent.id)
