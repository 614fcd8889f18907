"""The guest side of a sandbox's network: load the NIC driver on request, then give the NIC the MAC, address and
default route the host chose, and name the allowed hosts in /etc/hosts.

Nothing here is a security boundary: user code runs as root in the guest and may undo all of it. The host filters
every packet in the sandbox's own network namespace (service/engine/network.py); this only makes the allowed
paths usable. Until a sandbox is given a network its NIC has no driver, so the guest shows no interface at all.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import subprocess
import time
from typing import Any

from appliance_agent.arguments import BadRequest
from appliance_agent.protocol import HOSTNAME, NETWORK_MODULES_DIR

# The on-demand modules (protocol.NETWORK_MODULES_DIR); `order` there lists them in load order.
MODULES_DIR = NETWORK_MODULES_DIR
_SYS_FINIT_MODULE = 313  # x86_64
_HOSTS_MARK = "# appliance: allowed hosts (resolved on the host at creation)"
_BASE_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_HOSTS = 256


class NetConfigError(Exception):
    pass


class NetConfig:
    """The checked arguments of net_config. Checked strictly: they end up in `ip -batch` and /etc/hosts.
    (This module is imported on the first net_config only: ipaddress and re cost boot time under TCG.)"""

    def __init__(self, message: dict[str, Any]) -> None:
        mac, address, gateway, hosts = (message.get(k) for k in ("mac", "address", "gateway", "hosts"))
        if not isinstance(mac, str) or not _MAC.match(mac):
            raise BadRequest("mac must be six lower-case hex pairs separated by ':'")
        try:
            if not isinstance(address, str) or "/" not in address:
                raise ValueError("no prefix")
            interface = ipaddress.IPv4Interface(address)
            gateway_ip = ipaddress.IPv4Address(gateway if isinstance(gateway, str) else "")
        except ValueError:
            raise BadRequest("address must be an IPv4 address with a prefix, gateway an IPv4 address") from None
        if not isinstance(hosts, dict) or len(hosts) > MAX_HOSTS:
            raise BadRequest(f"hosts must be an object of at most {MAX_HOSTS} names")
        self.hosts: dict[str, str] = {}
        for name, ip in hosts.items():
            if not isinstance(name, str) or not HOSTNAME.match(name):
                raise BadRequest(f"hosts: {name!r} is not a host name")
            try:
                self.hosts[name] = str(ipaddress.ip_address(ip if isinstance(ip, str) else ""))
            except ValueError:
                raise BadRequest(f"hosts: {name}: {ip!r} is not an IP address") from None
        self.mac = mac
        self.address = interface.with_prefixlen
        self.gateway = str(gateway_ip)


_VIRTIO_DEVICES, _VIRTIO_NET_DRIVER = "/sys/bus/virtio/devices", "/sys/bus/virtio/drivers/virtio_net"
_VIRTIO_ID_NET = "0x0001"


def prepare() -> list[str]:
    """Load the NIC driver now but leave the NIC without it: no interface until configure() binds it, which
    then costs a probe instead of a module load (the pool keeper does this once in the template)."""
    loaded = load_modules()
    for device in _net_devices():
        if os.path.exists(os.path.join(device, "driver")):
            _write(os.path.join(_VIRTIO_NET_DRIVER, "unbind"), os.path.basename(device))
    return loaded


def _net_devices() -> list[str]:
    found = []
    for name in sorted(os.listdir(_VIRTIO_DEVICES)):
        path = os.path.join(_VIRTIO_DEVICES, name)
        try:
            with open(os.path.join(path, "device")) as kind:
                if kind.read().strip() == _VIRTIO_ID_NET:
                    found.append(path)
        except OSError:
            continue
    return found


def _bind() -> None:
    for device in _net_devices():
        if not os.path.exists(os.path.join(device, "driver")):
            _write(os.path.join(_VIRTIO_NET_DRIVER, "bind"), os.path.basename(device))


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as out:
            out.write(value)
    except OSError as exc:
        raise NetConfigError(f"cannot write {value} to {path}: {exc.strerror}") from None


def load_modules(root: str = "/") -> list[str]:
    """finit_module() each listed module that is not loaded yet."""
    if os.path.isdir("/sys/module/virtio_net"):
        return []  # prepared in the template, or a clone of a networked sandbox
    directory = os.path.join(root, MODULES_DIR)
    try:
        with open(os.path.join(directory, "order")) as listing:
            names = [line.strip() for line in listing if line.strip()]
    except OSError as exc:
        raise NetConfigError(f"this guest image has no network modules ({exc.strerror}); rebuild it") from None
    libc = ctypes.CDLL(None, use_errno=True)
    loaded = []
    for name in names:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.syscall(_SYS_FINIT_MODULE, fd, b"", 0) != 0:
                err = ctypes.get_errno()
                if err != errno.EEXIST:
                    raise NetConfigError(f"cannot load kernel module {name}: {os.strerror(err)}")
            else:
                loaded.append(name)
        finally:
            os.close(fd)
    return loaded


def find_nic(timeout_s: float = 5.0, sysfs: str = "/sys/class/net") -> str:
    """The one interface besides loopback (the driver registers it a moment after the module loads)."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = sorted(name for name in os.listdir(sysfs) if name != "lo")
        if names:
            return names[0]
        if time.monotonic() > deadline:
            raise NetConfigError("the network interface did not appear after loading its driver")
        time.sleep(0.01)


def ip_batch(interface: str, mac: str, address: str, gateway: str) -> str:
    """Commands for `ip -batch -`. Taking the link down first drops the old routes and neighbours: a clone of a
    networked sandbox arrives with its parent's address, MAC and ARP cache."""
    return "".join(f"{line}\n" for line in (
        f"link set dev {interface} down",
        f"link set dev {interface} address {mac}",
        f"addr flush dev {interface}",
        f"addr add {address} dev {interface}",
        f"link set dev {interface} up",
        f"route replace default via {gateway} dev {interface}",
    ))


def hosts_file(hosts: dict[str, str]) -> str:
    lines = [_BASE_HOSTS, f"{_HOSTS_MARK}\n"] if hosts else [_BASE_HOSTS]
    lines += [f"{ip}\t{name}\n" for name, ip in sorted(hosts.items())]
    return "".join(lines)


def configure(config: NetConfig) -> dict[str, Any]:
    """Bind the driver (loading it if need be), then give the NIC its identity and route; name the hosts."""
    loaded = load_modules()
    _bind()
    interface = find_nic()
    try:
        done = subprocess.run(  # safe in PID 1: the agent reaps in its loop, which does not run during this call
            ["ip", "-batch", "-"], input=ip_batch(interface, config.mac, config.address, config.gateway),
            capture_output=True, text=True, timeout=10,
        )
    except subprocess.TimeoutExpired:
        raise NetConfigError(f"configuring {interface} took more than 10 s") from None
    if done.returncode != 0:
        raise NetConfigError(f"configuring {interface} failed: {done.stderr.strip() or done.returncode}")
    tmp = "/etc/hosts.appliance-tmp"
    with open(tmp, "w") as out:
        out.write(hosts_file(config.hosts))
    os.replace(tmp, "/etc/hosts")
    return {"interface": interface, "mac": config.mac, "address": config.address, "loaded": loaded}


# The agent's handlers for protocol.NET_OPS: a request in, the fields of its ok event out.
HANDLERS = {
    "net_config": lambda message: configure(NetConfig(message)),
    "net_prepare": lambda _message: {"loaded": prepare()},
}
