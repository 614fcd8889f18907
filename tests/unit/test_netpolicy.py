"""Network policies: parsing, resolution, addresses and the rulesets, without touching the host."""

from __future__ import annotations

import ipaddress

import pytest
from appliance_agent.arguments import BadRequest
from appliance_agent.netconfig import NetConfig, hosts_file, ip_batch

from service.engine.netpolicy import (
    NOT_PUBLIC,
    PolicyError,
    Slot,
    check_private_allow,
    check_range,
    host_addresses,
    host_ruleset,
    namespace_ruleset,
    parse_policy,
    random_mac,
    resolve,
    resolved_from_json,
    slot_count,
)

RANGE = ipaddress.IPv4Network("100.96.0.0/16")
TENS = check_private_allow(["10.0.0.0/8"])  # an operator's opt-in, for the tests that use such addresses


def test_no_policy_means_no_network_and_modes_round_trip():
    assert parse_policy(None) is None
    for data in ({"egress": "none"}, {"egress": "all"}, {"egress": {"allow": ["10.1.2.0/24", "db.internal:5432"]}}):
        assert parse_policy(data).to_json() == data


@pytest.mark.parametrize(("data", "words"), [
    ("all", "object"),
    ({"egress": "everything"}, "must be"),
    ({"egress": "all", "ingress": "all"}, "one key"),
    ({"egress": {"allow": []}}, "1 to 64"),
    ({"egress": {"allow": ["10.0.0.0/8"] * 65}}, "1 to 64"),
    ({"egress": {"allow": [5]}}, "not a string"),
    ({"egress": {"allow": ["10.0.0.1:0"]}}, "port"),
    ({"egress": {"allow": ["db:http"]}}, "port"),
    ({"egress": {"allow": ["300.1.2.3"]}}, "not a valid IPv4"),
    ({"egress": {"allow": ["0.0.0.0/0"]}}, "say \"all\""),
    ({"egress": {"allow": ["fd00::1"]}}, "IPv6"),
    ({"egress": {"allow": ["bad_name!"]}}, "not a CIDR"),
])
def test_malformed_policies_are_refused_with_the_entry_named(data, words):
    with pytest.raises(PolicyError, match=words):
        parse_policy(data)


def test_names_resolve_to_rules_and_guest_hosts_entries():
    policy = parse_policy({"egress": {"allow": ["DB.internal:5432", "10.1.2.0/24"]}})
    resolved = resolve(policy, lambda name: {"db.internal": ["10.9.9.8", "10.9.9.9"]}[name], TENS)
    assert [(str(r.network), r.port) for r in resolved.rules] == [
        ("10.9.9.8/32", 5432), ("10.9.9.9/32", 5432), ("10.1.2.0/24", None)]
    assert resolved.hosts == {"db.internal": "10.9.9.8"}


def test_a_name_that_does_not_resolve_is_an_error():
    def fails(name: str) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(PolicyError, match="cannot resolve 'nowhere'"):
        resolve(parse_policy({"egress": {"allow": ["nowhere:80"]}}), fails)
    with pytest.raises(PolicyError, match="no IPv4"):
        resolve(parse_policy({"egress": {"allow": ["nowhere:80"]}}), lambda name: [])


def test_slots_do_not_overlap_and_their_links_are_point_to_point():
    seen: set[ipaddress.IPv4Address] = set()
    for index in (1, 2, 3, slot_count(RANGE) - 1):
        slot = Slot(index, RANGE)
        mine = {slot.host_ip, slot.ns_ip, slot.gateway_ip, slot.guest_ip}
        assert not mine & seen and all(address in RANGE for address in mine)
        seen |= mine
        assert slot.guest_ip in slot.guest_subnet and slot.gateway_ip in slot.guest_subnet
        assert len(slot.host_veth) <= 15 and len(slot.tap_name) <= 15  # Linux interface names
    assert slot_count(RANGE) == 8192
    with pytest.raises(PolicyError, match="too small"):
        check_range("10.0.0.0/30")


def test_macs_are_locally_administered_unicast_and_random():
    mac = random_mac(bytes([1, 2, 3, 4, 5]))
    assert mac == "02:01:02:03:04:05"
    first_octet = int(mac.split(":")[0], 16)
    assert first_octet & 0b10 and not first_octet & 0b1


def test_namespace_ruleset_per_mode():
    slot = Slot(3, RANGE)
    allow = resolve(parse_policy({"egress": {"allow": ["10.1.2.3:443", "10.5.0.0/16"]}}), private_allow=TENS)
    rules = namespace_ruleset(allow, slot, RANGE)
    assert "policy drop" in rules.split("chain forward")[1].split("\n")[1]
    assert "ip daddr 10.1.2.3/32 meta l4proto { tcp, udp } th dport 443 accept" in rules
    assert "ip daddr 10.5.0.0/16 accept" in rules
    assert f"ip saddr != {slot.guest_ip} drop" in rules  # a guest cannot borrow another address
    # Other sandboxes are refused before any allow rule can match them.
    assert rules.index(f"ip daddr {RANGE} reject") < rules.index("10.1.2.3/32")
    none = namespace_ruleset(resolve(parse_policy({"egress": "none"})), slot, RANGE)
    assert 'oifname "uplink"' not in none
    everything = namespace_ruleset(resolve(parse_policy({"egress": "all"})), slot, RANGE)
    assert 'iifname "tap0" oifname "uplink" meta nfproto ipv4 accept' in everything  # IPv6 matches nothing


def test_the_non_public_ranges_are_what_ipaddress_calls_not_global():
    for network in NOT_PUBLIC:
        assert not network.is_global or network.is_multicast, network  # multicast: "global", but not a server
    for public in ("1.1.1.1", "8.8.8.8", "192.88.99.7", "100.128.0.1", "172.32.0.1", "198.20.0.1", "223.255.255.1"):
        assert not any(ipaddress.IPv4Address(public) in network for network in NOT_PUBLIC), public
    for private in ("169.254.169.254", "10.0.0.1", "172.31.255.255", "192.168.0.1", "100.64.0.1", "127.0.0.1",
                    "198.18.7.2", "198.19.255.255", "0.0.0.0", "224.0.0.1", "255.255.255.255", "192.0.2.2"):
        assert any(ipaddress.IPv4Address(private) in network for network in NOT_PUBLIC), private


@pytest.mark.parametrize("entry", ["169.254.169.254", "169.254.169.254:80", "10.1.2.0/24", "100.64.1.1:443",
                                   "127.0.0.1", "192.168.1.0/24", "172.16.0.0/12", "198.18.7.2:8000", "224.0.0.1"])
def test_allow_entries_off_the_public_internet_are_refused_unless_opted_in(entry):
    policy = parse_policy({"egress": {"allow": [entry]}})
    with pytest.raises(PolicyError, match=r"not on the public internet \(it is in .*service.egress_private_allow"):
        resolve(policy)
    opt_in = check_private_allow([str(ipaddress.IPv4Network(entry.split(":")[0], strict=False).supernet(4))])
    assert resolve(policy, private_allow=opt_in).rules  # the operator's opt-in lets it through
    assert resolve(parse_policy({"egress": {"allow": ["1.2.3.0/24", "8.0.0.0/6"]}})).rules  # public, or partly


def test_a_name_that_resolves_off_the_public_internet_is_refused_and_says_why():
    policy = parse_policy({"egress": {"allow": ["metadata.internal:80"]}})
    with pytest.raises(PolicyError, match=r"'metadata.internal' resolves to 169.254.169.254, which is not on the "
                                          r"public internet.*service.egress_private_allow"):
        resolve(policy, lambda name: ["1.2.3.4", "169.254.169.254"])  # one bad address is enough
    opt_in = check_private_allow(["169.254.169.254/32"])
    assert resolve(policy, lambda name: ["169.254.169.254"], opt_in).hosts == {"metadata.internal": "169.254.169.254"}


def test_the_private_allow_setting_is_checked_and_merged():
    assert check_private_allow(["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/24"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.168.0.0/24"))  # no overlap reaches nft
    with pytest.raises(PolicyError, match="egress_private_allow"):
        check_private_allow(["10.0.0.1/8"])


def test_the_filter_refuses_the_host_and_what_is_not_public_before_any_policy_rule():
    slot = Slot(3, RANGE)
    host = (ipaddress.IPv4Address("192.0.2.2"), ipaddress.IPv4Address("198.18.7.1"))
    opt_in = check_private_allow(["198.18.7.0/24"])
    for policy in ({"egress": "all"}, {"egress": {"allow": ["198.18.7.0/24"]}}):
        rules = namespace_ruleset(resolve(parse_policy(policy), private_allow=opt_in), slot, RANGE, host, opt_in)
        forward = rules.split("chain forward")[1].split("}\n")[0]
        host_rule = 'iifname "tap0" ip daddr { 192.0.2.2, 198.18.7.1 } reject'
        private_rule = 'iifname "tap0" ip daddr != { 198.18.7.0/24 } ip daddr { 0.0.0.0/8, 10.0.0.0/8,'
        first_accept = forward.index('oifname "uplink"')
        assert forward.index(host_rule) < forward.index(private_rule) < first_accept
        assert "169.254.0.0/16" in forward.split(private_rule)[1].split("\n")[0]
    everything = namespace_ruleset(resolve(parse_policy({"egress": "all"})), slot, RANGE)
    assert 'iifname "tap0" ip daddr { 0.0.0.0/8, 10.0.0.0/8,' in everything  # no opt-in: no exception either


def test_the_host_addresses_are_read_from_ip_json_without_the_sandbox_links():
    text = """[{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
              {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "203.0.113.9", "prefixlen": 24},
                                               {"family": "inet6", "local": "fd00::2", "prefixlen": 64}]},
              {"ifname": "aplsb1h", "addr_info": [{"family": "inet", "local": "100.96.0.9", "prefixlen": 30}]},
              {"ifname": "dummy0"}]"""
    assert [str(a) for a in host_addresses(text, RANGE)] == ["127.0.0.1", "203.0.113.9"]


def test_host_ruleset_shields_the_host_and_masquerades_the_range():
    rules = host_ruleset(RANGE)
    assert 'iifname "aplsb*" drop' in rules
    assert f'ip saddr {RANGE} oifname != "aplsb*" masquerade' in rules
    assert rules.index("delete table") < rules.index("table ip appliance_sandboxes {")  # replaced atomically


def test_guest_side_arguments_are_checked_strictly():
    good = {"mac": "02:00:00:00:00:01", "address": "100.96.0.6/30", "gateway": "100.96.0.5",
            "hosts": {"db.internal": "10.9.9.9"}}
    config = NetConfig(good)
    assert (config.address, config.gateway) == ("100.96.0.6/30", "100.96.0.5")
    for bad in ({"mac": "02:00:00:00:00:01; reboot"}, {"address": "100.96.0.6"}, {"gateway": "eth0"},
                {"hosts": {"a b": "10.0.0.1"}}, {"hosts": {"db": "not-an-ip"}}, {"hosts": []}):
        with pytest.raises(BadRequest):
            NetConfig({**good, **bad})


def test_guest_commands_drop_the_old_identity_first():
    batch = ip_batch("eth0", "02:00:00:00:00:01", "100.96.0.6/30", "100.96.0.5").splitlines()
    assert batch[0] == "link set dev eth0 down" and batch[-1] == "route replace default via 100.96.0.5 dev eth0"
    assert "addr flush dev eth0" in batch
    assert hosts_file({"db.internal": "10.9.9.9"}).endswith("10.9.9.9\tdb.internal\n")
    assert "localhost" in hosts_file({})


def test_a_resolved_policy_crosses_the_launcher_socket_intact_and_checked():
    resolved = resolve(parse_policy({"egress": {"allow": ["db.internal:5432", "10.1.2.0/24"]}}),
                       lambda name: ["10.9.9.9"], TENS)
    assert resolved_from_json(resolved.to_json()) == resolved
    for bad in ({**resolved.to_json(), "egress": "some"},
                {**resolved.to_json(), "rules": [["10.0.0.0/8", 70000]]},
                {**resolved.to_json(), "rules": [["not-a-cidr", None]]},
                {**resolved.to_json(), "hosts": {"a b": "10.0.0.1"}},
                {"egress": "all"}):
        with pytest.raises(PolicyError, match="malformed resolved policy"):
            resolved_from_json(bad)


def test_every_network_op_of_the_protocol_has_a_guest_handler():
    from appliance_agent import netconfig
    from appliance_agent.protocol import NET_OPS, OPS

    assert set(netconfig.HANDLERS) == set(NET_OPS) and set(NET_OPS) <= OPS
