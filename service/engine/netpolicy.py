"""What a sandbox may reach on the network, and what that becomes on the host. Pure logic (no I/O but the
injected resolver): the policy from the API, its resolution to addresses, a sandbox's addresses from its slot,
and the nftables ruleset of its network namespace.

Policy JSON (the API's `network` field):  {"egress": "none" | "all" | {"allow": ["10.1.2.0/24", "db:5432", ...]}}
An allow entry is a CIDR, an address, or either with ":port", or a host name with an optional ":port". Names
are resolved on the host when the sandbox is created (and again when it is resumed): the guest gets them in its
/etc/hosts, but only the resolved addresses pass the filter. Whatever the policy, only the public internet is
reachable (NOT_PUBLIC below), plus what the operator opts in, and never the host's own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from appliance_agent.protocol import HOSTNAME  # what the guest accepts as a host name is what a policy may name

IPv4Net = ipaddress.IPv4Network
MAX_ALLOW = 64
EGRESS_MODES = ("none", "all")
# The names a sandbox's network is made of on the host. Interface names stay under Linux's 15 characters.
NETNS_PREFIX = "appliance-net-"
HOST_VETH_PREFIX = "aplsb"  # + slot + "h": the host's end of the sandbox's link, in the host namespace
NS_VETH, NS_TAP = "uplink", "tap0"  # inside the sandbox's namespace
SLOT_SIZE = 8  # addresses per sandbox: a /30 for the host link, a /30 for the guest link

Resolver = Callable[[str], list[str]]

# What is not the public internet (IANA's special-purpose registry, RFC 6890 and successors): "all" never reaches it
# and an allow-list may not name it, unless the operator opts a range in (spec `service.egress_private_allow`).
# Cloud metadata (169.254.169.254) is link-local; 198.18.0.0/15 (benchmarking) and the documentation nets are no
# one's internet either. The host's own addresses are refused on top of these, whatever the opt-in.
NOT_PUBLIC: tuple[IPv4Net, ...] = tuple(ipaddress.IPv4Network(cidr) for cidr in (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # carrier-grade NAT (RFC 6598): often the provider's own network
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local, cloud metadata services
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",  # documentation (TEST-NET-1/2/3)
    "198.18.0.0/15",  # benchmarking (RFC 2544)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the limited broadcast address
))


class PolicyError(ValueError):
    """A policy the API refuses (the message names the entry and what is allowed)."""


@dataclass(frozen=True)
class AllowEntry:
    text: str  # as the user wrote it
    network: IPv4Net | None = None  # a literal address or CIDR
    name: str | None = None  # a host name, resolved later
    port: int | None = None  # None: every port


@dataclass(frozen=True)
class NetworkPolicy:
    egress: str  # "none" | "all" | "allow"
    allow: tuple[AllowEntry, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.egress == "allow":
            return {"egress": {"allow": [entry.text for entry in self.allow]}}
        return {"egress": self.egress}


def parse_policy(data: Any) -> NetworkPolicy | None:
    """None (no network at all) for a missing or null policy; PolicyError for anything malformed."""
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"egress"}:
        raise PolicyError('network must be an object with one key, "egress"')
    egress = data["egress"]
    if isinstance(egress, str):
        if egress not in EGRESS_MODES:
            raise PolicyError(f'network.egress must be "none", "all" or {{"allow": [...]}}, not {egress!r}')
        return NetworkPolicy(egress)
    if not isinstance(egress, dict) or set(egress) != {"allow"} or not isinstance(egress["allow"], list):
        raise PolicyError('network.egress must be "none", "all" or {"allow": [...]}, a list of CIDRs or host:port')
    entries = egress["allow"]
    if not 1 <= len(entries) <= MAX_ALLOW:
        raise PolicyError(f"network.egress.allow needs 1 to {MAX_ALLOW} entries (for none, say \"none\")")
    return NetworkPolicy("allow", tuple(parse_allow_entry(entry) for entry in entries))


def parse_allow_entry(entry: Any) -> AllowEntry:
    if not isinstance(entry, str) or not entry:
        raise PolicyError(f"network.egress.allow: {entry!r} is not a string")
    host, port = entry, None
    if entry.count(":") == 1:  # "host:port" or "a.b.c.d/n:port" (IPv6 is not supported: the guest has none)
        host, _, port_text = entry.partition(":")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise PolicyError(f"network.egress.allow: {entry!r}: the port must be 1-65535")
        port = int(port_text)
    elif ":" in entry:
        raise PolicyError(f"network.egress.allow: {entry!r}: IPv6 is not supported, use IPv4 or a host name")
    try:
        network = ipaddress.IPv4Network(host, strict=False)
    except ValueError:
        if host[:1].isdigit() and host.replace(".", "").replace("/", "").isdigit():
            raise PolicyError(f"network.egress.allow: {entry!r} is not a valid IPv4 address or CIDR") from None
        if not HOSTNAME.match(host):
            raise PolicyError(f"network.egress.allow: {entry!r} is not a CIDR, an address or a host name") from None
        return AllowEntry(entry, name=host.lower(), port=port)
    if "/" in host and network.prefixlen == 0:
        raise PolicyError(f"network.egress.allow: {entry!r} allows everything; say \"all\" instead")
    return AllowEntry(entry, network=network, port=port)


@dataclass(frozen=True)
class Rule:
    network: IPv4Net
    port: int | None


@dataclass(frozen=True)
class ResolvedPolicy:
    egress: str
    rules: tuple[Rule, ...] = ()
    hosts: dict[str, str] = field(default_factory=dict)  # name -> first address, for the guest's /etc/hosts

    def to_json(self) -> dict[str, Any]:
        """The form an unprivileged API hands the root launcher: names already resolved, once."""
        return {"egress": self.egress, "rules": [[str(rule.network), rule.port] for rule in self.rules],
                "hosts": dict(self.hosts)}


def resolved_from_json(data: Any) -> ResolvedPolicy:
    """ResolvedPolicy.to_json read back, every value checked (it comes over the launcher's socket)."""
    try:
        egress, rules, hosts = data["egress"], data["rules"], data["hosts"]
        if egress not in (*EGRESS_MODES, "allow") or len(rules) > MAX_ALLOW * 16 or len(hosts) > MAX_ALLOW:
            raise ValueError("egress or sizes out of range")
        checked = []
        for network, port in rules:
            if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
                raise ValueError(f"port {port!r}")
            checked.append(Rule(ipaddress.IPv4Network(network), port))
        names = {}
        for name, address in hosts.items():
            if not isinstance(name, str) or not HOSTNAME.match(name):
                raise ValueError(f"host name {name!r}")
            names[name] = str(ipaddress.IPv4Address(address))
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyError(f"malformed resolved policy: {exc}") from None
    return ResolvedPolicy(egress, tuple(checked), names)


def system_resolver(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_private_allow(cidrs: Iterable[str]) -> tuple[IPv4Net, ...]:
    """The operator's opt-in (spec `service.egress_private_allow`) as networks, merged where they overlap."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.IPv4Network(cidr))
        except ValueError as exc:
            raise PolicyError(f"service.egress_private_allow: {cidr!r} is not an IPv4 CIDR: {exc}") from None
    return tuple(ipaddress.collapse_addresses(networks))


def not_public(network: IPv4Net, private_allow: tuple[IPv4Net, ...] = ()) -> IPv4Net | None:
    """The non-public range (NOT_PUBLIC) that holds all of `network`, unless the operator opted `network` in;
    None when `network` is public, opted in, or only partly private (the filter refuses that part anyway)."""
    if any(network.subnet_of(allowed) for allowed in private_allow):
        return None
    return next((denied for denied in NOT_PUBLIC if network.subnet_of(denied)), None)


_OPT_IN = "the operator can allow it with the spec setting service.egress_private_allow"


def resolve(policy: NetworkPolicy, resolver: Resolver = system_resolver,
            private_allow: tuple[IPv4Net, ...] = ()) -> ResolvedPolicy:
    """Names to addresses, now. A name that does not resolve is an error: the user asked for it by name. An entry
    (or what a name resolves to) that is not on the public internet is refused unless the operator opted it in:
    the filter would drop its traffic anyway, and a name pointing inside the host's networks is an attack."""
    rules: list[Rule] = []
    hosts: dict[str, str] = {}
    for entry in policy.allow:
        if entry.network is not None:
            denied = not_public(entry.network, private_allow)
            if denied is not None:
                raise PolicyError(f"network.egress.allow: {entry.text!r} is not on the public internet "
                                  f"(it is in {denied}); {_OPT_IN}")
            rules.append(Rule(entry.network, entry.port))
            continue
        assert entry.name is not None
        try:
            addresses = resolver(entry.name)
        except OSError as exc:
            raise PolicyError(f"network.egress.allow: cannot resolve {entry.name!r} on the host: {exc}") from None
        if not addresses:
            raise PolicyError(f"network.egress.allow: {entry.name!r} has no IPv4 address")
        for address in addresses:
            denied = not_public(ipaddress.IPv4Network(address), private_allow)
            if denied is not None:
                raise PolicyError(f"network.egress.allow: {entry.name!r} resolves to {address}, which is not on the "
                                  f"public internet (it is in {denied}); {_OPT_IN}")
        hosts[entry.name] = addresses[0]
        rules += [Rule(ipaddress.IPv4Network(address), entry.port) for address in addresses]
    return ResolvedPolicy(policy.egress, tuple(dict.fromkeys(rules)), hosts)


def host_addresses(ip_json: str, sandbox_range: IPv4Net) -> tuple[ipaddress.IPv4Address, ...]:
    """The host's own IPv4 addresses from `ip -j -4 addr show` (the sandbox links' own ends excepted: the whole
    sandbox range is refused by its own rule)."""
    found = set()
    for interface in json.loads(ip_json):
        for info in interface.get("addr_info", []):
            if info.get("family") == "inet":
                address = ipaddress.IPv4Address(info["local"])
                if address not in sandbox_range:
                    found.add(address)
    return tuple(sorted(found))


@dataclass(frozen=True)
class Slot:
    """A sandbox's place in the sandbox address range: 8 addresses, two point-to-point /30 links.
    host <-> namespace:  .1 host end (apl<N>h), .2 namespace end (uplink)
    namespace <-> guest: .5 the tap (the guest's gateway), .6 the guest"""

    index: int
    cidr: IPv4Net

    @property
    def base(self) -> ipaddress.IPv4Address:
        return self.cidr.network_address + self.index * SLOT_SIZE

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def host_veth(self) -> str:
        return f"{HOST_VETH_PREFIX}{self.index}h"

    @property
    def tap_name(self) -> str:  # the tap's name while it is created in the host namespace, before it moves
        return f"{HOST_VETH_PREFIX}{self.index}t"

    def address(self, offset: int) -> ipaddress.IPv4Address:
        return self.base + offset

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        return self.address(1)

    @property
    def ns_ip(self) -> ipaddress.IPv4Address:
        return self.address(2)

    @property
    def gateway_ip(self) -> ipaddress.IPv4Address:
        return self.address(5)

    @property
    def guest_ip(self) -> ipaddress.IPv4Address:
        return self.address(6)

    @property
    def guest_subnet(self) -> IPv4Net:
        return ipaddress.IPv4Network(f"{self.address(4)}/30")


def slot_count(cidr: IPv4Net) -> int:
    return cidr.num_addresses // SLOT_SIZE


def check_range(cidr_text: str) -> IPv4Net:
    try:
        cidr = ipaddress.IPv4Network(cidr_text)
    except ValueError as exc:
        raise PolicyError(f"network range {cidr_text!r} is not an IPv4 CIDR: {exc}") from None
    if cidr.prefixlen > 29:
        raise PolicyError(f"network range {cidr_text!r} is too small: a sandbox needs 8 addresses")
    return cidr


def random_mac(random_bytes: bytes) -> str:
    """A locally administered unicast MAC from 5 random bytes (02:xx:...): never a copy of the parent's."""
    return ":".join(f"{b:02x}" for b in (0x02, *random_bytes[:5]))


def _nft_set(items: Iterable[object]) -> str:
    return "{ " + ", ".join(str(item) for item in items) + " }"


def namespace_ruleset(resolved: ResolvedPolicy, slot: Slot, sandbox_range: IPv4Net,
                      host: tuple[ipaddress.IPv4Address, ...] = (), private_allow: tuple[IPv4Net, ...] = ()) -> str:
    """nftables for the sandbox's own namespace (`nft -f`): the guest may reach what the policy allows and
    nothing else; nothing may start a connection into the guest; the namespace itself sends nothing (the only
    process there is none: QEMU writes the tap through a descriptor from its own, empty namespace).

    Before any policy rule: the sandbox range, the host's own addresses (`host`, read when the network is made)
    and every NOT_PUBLIC range the operator did not opt in (`private_allow`) are refused, so "all" means the
    public internet and an allow-list cannot reach further whatever the API handed over. IPv4 only: the guest has
    no IPv6 address, and an IPv6 packet matches no accept rule."""
    tap, uplink = NS_TAP, NS_VETH
    reject = "reject with icmpx type admin-prohibited"  # denied: fail fast, not a timeout
    accept: list[str]
    if resolved.egress == "all":
        accept = ["meta nfproto ipv4 accept"]
    elif resolved.egress == "none":
        accept = []
    else:
        accept = []
        for rule in resolved.rules:
            if rule.port is None:
                accept.append(f"ip daddr {rule.network} accept")
            else:
                accept.append(f"ip daddr {rule.network} meta l4proto {{ tcp, udp }} th dport {rule.port} accept")
    opted_in = f"ip daddr != {_nft_set(private_allow)} " if private_allow else ""
    forward = [
        "type filter hook forward priority filter; policy drop;",
        "ct state established,related accept",
        "ct state invalid drop",
        # A guest may change its own address (user code is root there): only its assigned one leaves.
        f'iifname "{tap}" ip saddr != {slot.guest_ip} drop',
        # Never to other sandboxes or the host's end of any sandbox link, whatever the policy says.
        f'iifname "{tap}" ip daddr {sandbox_range} {reject}',
        *([f'iifname "{tap}" ip daddr {_nft_set(host)} {reject}'] if host else []),  # the host itself
        f'iifname "{tap}" {opted_in}ip daddr {_nft_set(NOT_PUBLIC)} {reject}',  # not the public internet
        *(f'iifname "{tap}" oifname "{uplink}" {rule}' for rule in accept),
        f'iifname "{tap}" {reject}',
    ]
    lines = ["table inet appliance {"]
    lines += ["  chain forward {", *(f"    {line}" for line in forward), "  }"]
    lines += ["  chain input {", "    type filter hook input priority filter; policy drop;",
              '    iifname "lo" accept', "  }"]
    lines += ["  chain output {", "    type filter hook output priority filter; policy drop;",
              '    oifname "lo" accept', "    ct state established,related accept",
              f'    oifname "{tap}" icmp type destination-unreachable accept',  # the rejects above
              "  }"]
    lines += ["}"]
    return "\n".join(lines) + "\n"


def host_ruleset(sandbox_range: IPv4Net) -> str:
    """nftables for the host namespace, the same for every sandbox (applied once, idempotently): a sandbox
    reaches nothing on the host itself, and its traffic leaves with the host's address (masquerade)."""
    veths = f'"{HOST_VETH_PREFIX}*"'
    return "\n".join([
        "table ip appliance_sandboxes",
        "delete table ip appliance_sandboxes",
        "table ip appliance_sandboxes {",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    iifname {veths} ct state established,related accept",
        f"    iifname {veths} drop",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ip saddr {sandbox_range} oifname != {veths} masquerade",
        "  }",
        "}",
    ]) + "\n"
