"""A sandbox's network on the host: its own network namespace holding the filter (netpolicy.py), linked to the
host namespace by a veth pair and to the guest by a tap device whose descriptor QEMU gets over QMP.

    guest eth0 ── virtio NIC ── QEMU hub ── tap0 │ sandbox netns (nftables) │ uplink ══ aplsb<N>h │ host ── world
                                                 └── created here, filters every packet; QEMU is not in it ──┘

QEMU stays in its own empty namespace (jail.py): it holds the tap's descriptor, not a socket, so even a QEMU
escape sends only guest-shaped packets into the filter. The namespace's name doubles as the slot's claim: `ip
netns add` is atomic, so two API workers never get the same addresses. Needs root (CAP_NET_ADMIN).
Teardown is deleting the namespace: that removes the veth pair, the tap and the rules with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dirfd
from .errors import EngineError

if TYPE_CHECKING:
    from .launch import VmmLauncher
from .machine import NIC_ID
from .netpolicy import (
    NS_TAP,
    NS_VETH,
    ResolvedPolicy,
    Slot,
    check_private_allow,
    check_range,
    host_addresses,
    host_ruleset,
    namespace_ruleset,
    random_mac,
    slot_count,
)

log = logging.getLogger(__name__)

NETWORK_FILE = "network.json"  # in the VM dir: which slot it holds, so any process can tear it down
# Beside the VM dirs: one file per slot this service claimed, naming the VM dir, written right after the claim.
# It is how a service finds (only) its own leftovers after a crash: other services on the host use other dirs.
SLOTS_DIR = ".netslots"
_NETNS_DIR = Path("/run/netns")
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000
_TAP_FD_NAME, _TAP_NETDEV, _TAP_HUB_PORT = "tap", "tap0", "taphub0"


NFT, IP = "nft", "ip"


class NetworkError(EngineError):
    pass


@dataclass(frozen=True)
class NetworkSettings:
    sandbox_range: str  # isolation.network_range: 8 addresses per networked sandbox
    private_allow: tuple[str, ...]  # service.egress_private_allow: non-public ranges the operator opted in


@dataclass(frozen=True)
class Attachment:
    slot: Slot
    mac: str
    hosts: dict[str, str]

    def describe(self) -> dict[str, Any]:
        """What the API shows about a sandbox's network identity."""
        return {"mac": self.mac, "address": str(self.slot.guest_ip), "host_address": str(self.slot.ns_ip)}


def unavailable() -> str | None:
    """Why this process cannot give sandboxes a network itself, or None (a root daemon's client asks it instead:
    launch.RemoteLauncher)."""
    if os.geteuid() != 0:
        return "sandbox networks need root (network namespaces, nftables): run the VMM launcher, or the service as root"
    if not os.path.exists("/dev/net/tun"):
        return "sandbox networks need /dev/net/tun"
    for tool, package in ((NFT, "nftables"), (IP, "iproute2")):
        if shutil.which(tool) is None:  # else the first create with a policy fails half-way, as a 500
            return f"sandbox networks need {tool}, which is not on the service's PATH (apt-get install {package})"
    return None


def attach(vm: Any, call: Any, resolved: ResolvedPolicy, settings: NetworkSettings,
           launcher: VmmLauncher) -> Attachment:
    """Give a running VM the network `resolved` describes: the host half by the launcher that starts this
    engine's VMs (here, or the root daemon), then the guest half through the agent (`call` is Sandbox.call). On
    failure the caller stops the VM, which removes whatever was made on the host."""
    attachment = launcher.attach_network_host(vm, resolved, settings)
    reply = call("net_config", mac=attachment.mac, address=f"{attachment.slot.guest_ip}/30",
                 gateway=str(attachment.slot.gateway_ip), hosts=attachment.hosts)
    if reply.get("ev") != "ok":
        raise NetworkError(f"the guest could not configure its network: {reply.get('message', reply)}")
    return attachment


def attach_host(vm: Any, resolved: ResolvedPolicy, settings: NetworkSettings) -> Attachment:
    """The host side (root): namespace, links, filter, the tap handed to QEMU, its NIC link up. On failure
    nothing is left on the host."""
    why = unavailable()
    if why is not None:
        raise NetworkError(why)
    sandbox_range = check_range(settings.sandbox_range)
    _ensure_host_rules(sandbox_range)
    private_allow = check_private_allow(settings.private_allow)
    slot = _claim_slot(sandbox_range)
    # Root writes only into directories it opened without following links, by names it picks (dirfd.py): the
    # slot marker beside the VM dirs (the launcher's own directory under a launcher), the record in the VM dir.
    parent_fd = slots_fd = vm_fd = -1
    wrote_record = False
    try:
        parent_fd = dirfd.open_dir(vm.dir.parent)
        slots_fd = dirfd.ensure_dir(parent_fd, SLOTS_DIR, 0o700)
        vm_fd = dirfd.open_dir(vm.dir.name, parent_fd)
        dirfd.replace_file(slots_fd, str(slot.index), json.dumps({"vm_dir": str(vm.dir), "range": str(sandbox_range)}))
        # The record first, before QEMU is touched: a name planted in the VM dir refuses the network right here.
        dirfd.write_new(vm_fd, NETWORK_FILE, json.dumps({"slot": slot.index, "range": str(sandbox_range)}))
        wrote_record = True
        tap_fd = _build_namespace(slot, resolved, sandbox_range, private_allow)
        try:
            qmp = vm.qmp()
            qmp.send_fd_scm(tap_fd)
            qmp.cmd("getfd", fdname=_TAP_FD_NAME)
        finally:
            os.close(tap_fd)
        qmp.cmd("netdev_add", type="tap", id=_TAP_NETDEV, fd=_TAP_FD_NAME)
        qmp.cmd("netdev_add", type="hubport", id=_TAP_HUB_PORT, hubid=0, netdev=_TAP_NETDEV)
        set_link(vm, up=True)  # a fork's or resume's NIC arrives down (link_down below)
    except BaseException as exc:
        teardown_slot(slot)
        for fd, name in ((vm_fd if wrote_record else -1, NETWORK_FILE), (slots_fd, str(slot.index))):
            if fd >= 0:  # only what we wrote: a name someone else planted is left alone
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=fd)
        if isinstance(exc, NetworkError):
            raise
        if isinstance(exc, Exception):
            raise NetworkError(f"cannot give the sandbox its network: {exc}") from None
        raise
    finally:
        for fd in (parent_fd, slots_fd, vm_fd):
            if fd >= 0:
                os.close(fd)
    return Attachment(slot, random_mac(secrets.token_bytes(5)), resolved.hosts)


def detach(vm_dir: Path) -> None:
    """Remove the network of the VM whose directory this is, if it has one (called when a VM stops)."""
    record = vm_dir / NETWORK_FILE
    try:
        data = json.loads(record.read_text())
        slot = Slot(int(data["slot"]), check_range(data["range"]))
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read %s: %s", record, exc)
        return
    teardown_slot(slot)
    with contextlib.suppress(OSError):
        record.unlink()
    with contextlib.suppress(OSError):
        dirfd.unlink_below(vm_dir.parent, SLOTS_DIR, str(slot.index))


def remove_leftovers(vms_dir: Path, min_age_s: float = 60.0) -> list[str]:
    """Tear down the slots this service claimed for VMs that are gone (a crash between claim and teardown).
    Young claims are spared: their create may still be running. (Root only: under a launcher, nothing.)"""
    removed: list[str] = []
    if os.geteuid() != 0:
        return removed
    for marker in sorted((vms_dir / SLOTS_DIR).glob("*")):
        try:
            if time.time() - marker.stat().st_mtime < min_age_s:
                continue
            data = json.loads(marker.read_text())
            vm_dir = Path(data["vm_dir"])
            slot = Slot(int(marker.name), check_range(data["range"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (vm_dir / NETWORK_FILE).exists():
            continue  # held: its VM stops through VirtualMachine.stop, which detaches
        teardown_slot(slot)
        with contextlib.suppress(OSError):
            marker.unlink()
        removed.append(slot.netns)
    return removed


def teardown_slot(slot: Slot) -> None:
    done = subprocess.run([IP, "netns", "delete", slot.netns], capture_output=True, text=True)
    if done.returncode != 0 and (_NETNS_DIR / slot.netns).exists():
        log.warning("cannot delete network namespace %s: %s", slot.netns, done.stderr.strip())
    with contextlib.suppress(OSError):  # normally gone with its peer; left over if the netns step failed
        subprocess.run([IP, "link", "delete", slot.host_veth], capture_output=True)


# ---- the steps ------------------------------------------------------------------------------------------------

_host_rules_applied: set[str] = set()


def _ensure_host_rules(sandbox_range: Any) -> None:
    if str(sandbox_range) in _host_rules_applied:
        return
    _run([NFT, "-f", "-"], host_ruleset(sandbox_range), "installing the host's sandbox rules")
    _host_rules_applied.add(str(sandbox_range))
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "1":
        log.warning("net.ipv4.ip_forward is 0: sandboxes reach only networks whose replies come in on an interface "
                    "with forwarding enabled (set net.ipv4.conf.<uplink>.forwarding=1, or ip_forward=1)")


def _claim_slot(sandbox_range: Any) -> Slot:
    """The first free slot, claimed by creating its namespace (atomic: `ip netns add` fails if it exists)."""
    taken = {entry.name for entry in _NETNS_DIR.iterdir()} if _NETNS_DIR.is_dir() else set()
    for index in range(1, slot_count(sandbox_range)):  # slot 0 would use the range's network address
        slot = Slot(index, sandbox_range)
        if slot.netns in taken:
            continue
        done = subprocess.run([IP, "netns", "add", slot.netns], capture_output=True, text=True)
        if done.returncode == 0:
            return slot
        if not (_NETNS_DIR / slot.netns).exists():  # not a race lost to another worker: a real failure
            raise NetworkError(f"cannot create a network namespace: {done.stderr.strip()}")
    raise NetworkError(f"no free address slot left in the sandbox network range {sandbox_range}")


def _build_namespace(slot: Slot, resolved: ResolvedPolicy, sandbox_range: Any, private_allow: Any) -> int:
    """Links, addresses, routes and rules; returns the tap's descriptor (for QEMU)."""
    ns = slot.netns
    # The host's addresses as they are now, before this sandbox's link adds one: the filter refuses them all.
    host = host_addresses(_output([IP, "-j", "-4", "addr", "show"], "reading the host's addresses"), sandbox_range)
    # The tap is created here and moved: its descriptor stays valid and its packets flow in the namespace.
    tap_fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(tap_fd, _TUNSETIFF, struct.pack("16sH", slot.tap_name.encode(), _IFF_TAP | _IFF_NO_PI))
        host_batch = [
            f"link add {slot.host_veth} type veth peer name {NS_VETH} netns {ns}",
            f"link set {slot.tap_name} netns {ns}",
            f"addr add {slot.host_ip}/30 dev {slot.host_veth}",
            f"link set {slot.host_veth} up",
            f"route add {slot.guest_subnet} via {slot.ns_ip} dev {slot.host_veth}",
        ]
        ns_batch = [
            f"link set {slot.tap_name} name {NS_TAP}",
            "link set lo up",
            f"addr add {slot.ns_ip}/30 dev {NS_VETH}",
            f"link set {NS_VETH} up",
            f"addr add {slot.gateway_ip}/30 dev {NS_TAP}",
            f"link set {NS_TAP} up",
            f"route add default via {slot.host_ip} dev {NS_VETH}",
        ]
        _run([IP, "-batch", "-"], _lines(host_batch), "linking the sandbox namespace")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{slot.host_veth}/forwarding", "1")
        _run([IP, "-n", ns, "-batch", "-"], _lines(ns_batch), "addressing the sandbox namespace")
        # The filter first, then forwarding: no packet is ever forwarded unfiltered.
        _run([IP, "netns", "exec", ns, NFT, "-f", "-"],
             namespace_ruleset(resolved, slot, sandbox_range, host, private_allow), "loading the sandbox's filter")
        _run([IP, "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], "",
             "enabling forwarding in the sandbox namespace")
    except BaseException:
        os.close(tap_fd)
        raise
    return tap_fd


def _lines(lines: list[str]) -> str:
    return "".join(f"{line}\n" for line in lines)


def _output(argv: list[str], what: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        raise NetworkError(f"{what} failed: {done.stderr.strip()[:500]}")
    return done.stdout


def _run(argv: list[str], stdin: str, what: str) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"{what} failed: {exc}") from None
    if done.returncode != 0:
        raise NetworkError(f"{what} failed: {(done.stderr or done.stdout).strip()[:500]}")


def _write_sysctl(path: str, value: str) -> None:
    try:
        Path(path).write_text(value)
    except OSError as exc:
        raise NetworkError(f"cannot write {path}: {exc.strerror}") from None


def set_link(vm: Any, up: bool) -> None:
    vm.qmp().cmd("set_link", name=NIC_ID, up=up)


@contextlib.contextmanager
def link_down(vm: Any) -> Iterator[None]:
    """Hold a networked VM's NIC link down while its state is saved (fork, freeze), then bring it back up.

    Why: a copy starts with no backend until attach(). If its NIC's link were up, the guest's first packets
    (ARP, IPv6 neighbour discovery) would queue at the backend-less hub, and QEMU's virtio-net stops transmitting
    until that queue is flushed, which nothing does: the copy would never send again. A NIC whose link is down
    drops its packets instead, and the link state travels with the saved state."""
    set_link(vm, up=False)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a frozen VM is gone; a forked source carries on
            set_link(vm, up=True)


def nic_mac(vm: Any) -> str:
    """The MAC address QEMU's NIC filters on (the guest sets it; the host reads it back to check)."""
    return vm.qmp().cmd("query-rx-filter", name=NIC_ID)[0]["main-mac"]
