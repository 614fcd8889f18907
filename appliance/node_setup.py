"""A host image node's boot-time setup: grow the root, make the node's own secrets, apply the site config.

Part of the appliance package the roles install on the node, run as `python -m appliance.node_setup` from its
venv by two units at every boot (image-builder/host/files/etc/systemd/system/appliance-node-*.service):

    setup   appliance-node-setup.service, before SSH, nftables and the API:
            1. grows the root partition and file system to the disk (a no-op once done)
            2. creates missing SSH host keys (the image carries none) and the API key (/etc/appliance/api-key, 0600)
            3. reads site.toml from the partition labelled appliance-config, checks every value and renders the
               roles' own templates (copied from roles/*/templates at build time) with the role variables the
               image was built with (role-vars.json) and the site's values laid over them.
            A missing or malformed site.toml leaves the API down (the API unit requires this one) and says exactly
            what is wrong on the console and in the journal; steps 1-2 and the site's SSH keys still apply, so
            the node boots and stays repairable.
    ready   appliance-node-ready.service, after the API: waits for its health check and prints the address.

Beside the standard library it uses Jinja2 and the appliance's own spec loader and atomic writes (all in the venv
that runs it). `appliance build host` checks a site config with the same parse_site before it goes into an image.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIB = Path("/usr/lib/appliance-node")
CONFIG_PARTLABEL = "appliance-config"
CONFIG_MOUNT = Path("/run/appliance-node/config")
STATUS_FILE = Path("/run/appliance-node/status.json")
SITE_FILE = "site.toml"
API_KEY_FILE = Path("/etc/appliance/api-key")
NETWORK_FILE = Path("/etc/systemd/network/10-appliance.network")
# role template (relative to LIB/templates) -> file it renders, mode, owner, group
RENDERED = {
    "firewall/etc/nftables.conf.j2": ("/etc/nftables.conf", 0o644, "root", "root"),
    "appliance_api/etc/appliance/appliance.toml.j2": ("/etc/appliance/appliance.toml", 0o640, "root", "@api"),
    "appliance_api/etc/appliance/api.env.j2": ("/etc/appliance/api.env", 0o600, "root", "root"),
    "appliance_api/etc/systemd/system/appliance-api.service.j2":
        ("/etc/systemd/system/appliance-api.service", 0o644, "root", "root"),
}
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( .*)?$")
_BIND = re.compile(r"^[0-9a-fA-F:.]+$")


class SiteError(Exception):
    """What is wrong with the site configuration, one line naming the key."""


@dataclass
class Site:
    """The site's settings, checked; role_vars() maps them onto the roles' variables."""

    hostname: str | None = None
    network_mode: str = "dhcp"
    address: str | None = None
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)
    authorized_keys: list[str] = field(default_factory=list)
    ssh_networks: list[str] = field(default_factory=lambda: ["0.0.0.0/0", "::/0"])
    bind_address: str = "0.0.0.0"
    port: int = 8080
    api_networks: list[str] = field(default_factory=list)
    sandboxes: dict[str, Any] = field(default_factory=dict)

    def role_vars(self) -> dict[str, Any]:
        mapped: dict[str, Any] = {
            "appliance_api_bind_address": self.bind_address,
            "appliance_api_port": self.port,
            "firewall_api_port": self.port,
            "firewall_api_sources": self.api_networks,
            "firewall_ssh_sources": self.ssh_networks,
        }
        for key, value in self.sandboxes.items():
            mapped[SANDBOX_KEYS[key][0]] = value
        return mapped


# [sandboxes] key -> (role variable, type, lowest allowed)
SANDBOX_KEYS: dict[str, tuple[str, type, float]] = {
    "pool_size": ("appliance_api_pool_size", int, 0),
    "max_sandboxes": ("appliance_api_max_sandboxes", int, 1),
    "memory_mib": ("appliance_api_guest_memory_mib", int, 256),
    "vcpus": ("appliance_api_guest_vcpus", int, 1),
    "boot_timeout_s": ("appliance_api_boot_timeout_s", float, 1),
    "kvm_probe_timeout_s": ("appliance_api_kvm_probe_timeout_s", float, 1),
    "exec_timeout_s": ("appliance_api_exec_timeout_s", float, 1),
    "workers": ("appliance_api_workers", int, 1),
    "accelerator": ("appliance_api_accelerator", str, 0),
}
ACCELERATORS = ("auto", "kvm", "tcg")
SECTIONS = {
    "node": {"hostname"},
    "network": {"mode", "address", "gateway", "dns"},
    "ssh": {"authorized_keys", "allowed_networks"},
    "api": {"bind_address", "port", "allowed_networks"},
    "sandboxes": set(SANDBOX_KEYS),
}


# --- pure: parsing and checking -------------------------------------------------------------------------------


def _network(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise SiteError(f"{key}: {value!r} is not a string")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise SiteError(f"{key}: {value!r} is not an IPv4 or IPv6 network "
                        "(e.g. 192.0.2.0/24 or 2001:db8::/32)") from None


def _networks(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise SiteError(f"{key} must be a list of networks, e.g. [\"192.0.2.0/24\"]")
    return [_network(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _address(value: object, key: str, with_prefix: bool) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        if with_prefix:
            if "/" not in value:
                raise ValueError
            return str(ipaddress.ip_interface(value))
        return str(ipaddress.ip_address(value))
    except ValueError:
        example = "192.0.2.10/24" if with_prefix else "192.0.2.1"
        raise SiteError(f"{key}: {value!r} is not an address{' with a prefix length' if with_prefix else ''} "
                        f"(e.g. {example})") from None


def parse_site(text: str) -> Site:
    """The checked site config; SiteError names the first bad key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SiteError(f"not valid TOML: {exc}") from None
    return parse_data(data)


def ssh_keys_despite_errors(text: str) -> list[str]:
    """The [ssh] keys when they are valid on their own, even if the rest of the file is not (for repairs)."""
    try:
        ssh = tomllib.loads(text).get("ssh")
        return parse_data({"ssh": ssh}).authorized_keys if isinstance(ssh, dict) else []
    except (tomllib.TOMLDecodeError, SiteError):
        return []


def parse_data(data: dict[str, Any]) -> Site:
    site = Site()
    for section, value in data.items():
        if section not in SECTIONS:
            raise SiteError(f"unknown section [{section}] (known: {', '.join(f'[{s}]' for s in SECTIONS)})")
        if not isinstance(value, dict):
            raise SiteError(f"{section} must be a table ([{section}])")
        unknown = sorted(set(value) - SECTIONS[section])
        if unknown:
            raise SiteError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(SECTIONS[section]))})")
    node, network = data.get("node", {}), data.get("network", {})
    ssh, api, boxes = data.get("ssh", {}), data.get("api", {}), data.get("sandboxes", {})
    if "hostname" in node:
        if not isinstance(node["hostname"], str) or not _HOSTNAME.match(node["hostname"]):
            raise SiteError(f"node.hostname: {node['hostname']!r} is not a host name (lower-case letters, digits, -)")
        site.hostname = node["hostname"]
    site.network_mode = network.get("mode", "dhcp")
    if site.network_mode not in ("dhcp", "static"):
        raise SiteError(f"network.mode: {site.network_mode!r} is neither \"dhcp\" nor \"static\"")
    if site.network_mode == "static":
        if "address" not in network:
            raise SiteError("network.address is required when network.mode = \"static\" (e.g. \"192.0.2.10/24\")")
        site.address = _address(network["address"], "network.address", with_prefix=True)
        if "gateway" in network:
            site.gateway = _address(network["gateway"], "network.gateway", with_prefix=False)
        dns = network.get("dns", [])
        if not isinstance(dns, list):
            raise SiteError("network.dns must be a list of addresses")
        site.dns = [_address(item, f"network.dns[{i}]", with_prefix=False) for i, item in enumerate(dns)]
    elif set(network) - {"mode"}:
        raise SiteError(f"network.{sorted(set(network) - {'mode'})[0]} needs network.mode = \"static\"")
    keys = ssh.get("authorized_keys", [])
    if not isinstance(keys, list):
        raise SiteError("ssh.authorized_keys must be a list of public keys")
    for i, key in enumerate(keys):
        if not isinstance(key, str) or "\n" in key or not _SSH_KEY.match(key.strip()):
            raise SiteError(f"ssh.authorized_keys[{i}] is not an OpenSSH public key line (\"ssh-ed25519 AAAA… name\")")
    site.authorized_keys = [key.strip() for key in keys]
    if "allowed_networks" in ssh:
        site.ssh_networks = _networks(ssh["allowed_networks"], "ssh.allowed_networks")
        if not site.ssh_networks:
            raise SiteError("ssh.allowed_networks is empty: nobody could reach SSH; leave it out for everyone")
    if "bind_address" in api:
        bind = api["bind_address"]
        if not isinstance(bind, str) or not _BIND.match(bind):
            raise SiteError(f"api.bind_address: {bind!r} is not an IP address (0.0.0.0 is every interface)")
        site.bind_address = _address(bind, "api.bind_address", with_prefix=False)
    if "port" in api:
        port = api["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535 or port == 22:
            raise SiteError(f"api.port: {port!r} is not a TCP port (1-65535, not 22, which SSH uses)")
        site.port = port
    if "allowed_networks" in api:
        site.api_networks = _networks(api["allowed_networks"], "api.allowed_networks")
    for key, value in boxes.items():
        if key == "accelerator":
            if value not in ACCELERATORS:
                raise SiteError(f"sandboxes.accelerator: {value!r} is not one of {', '.join(ACCELERATORS)}")
            site.sandboxes["accelerator"] = value
            continue
        _, kind, lowest = SANDBOX_KEYS[key]
        ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or value < lowest:
            raise SiteError(f"sandboxes.{key}: {value!r} must be {'a number' if kind is float else 'an integer'} "
                            f">= {lowest:g}")
        site.sandboxes[key] = kind(value)
    return site



def network_unit(site: Site) -> str:
    """The systemd-networkd file for every Ethernet interface."""
    lines = ["# Written by appliance-node-setup from site.toml at every boot.", "[Match]", "Type=ether", "",
             "[Network]"]
    if site.network_mode == "dhcp":
        lines.append("DHCP=yes")
    else:
        lines.append(f"Address={site.address}")
        if site.gateway:
            lines.append(f"Gateway={site.gateway}")
        lines += [f"DNS={server}" for server in site.dns]
    return "\n".join(lines) + "\n"


def render_templates(templates: Path, role_vars: dict[str, Any]) -> dict[str, str]:
    """The roles' templates rendered as Ansible renders them (trim_blocks, strict), keyed by template name."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["to_json"] = json.dumps
    env.tests["match"] = lambda value, pattern: re.match(pattern, str(value)) is not None
    env.tests["search"] = lambda value, pattern: re.search(pattern, str(value)) is not None
    context = {**role_vars, "ansible_managed": "Written by appliance-node-setup from the appliance roles"}
    return {name: env.get_template(name).render(context) for name in RENDERED}


# --- I/O --------------------------------------------------------------------------------------------------------


def say(message: str) -> None:
    """One line to the journal and the console (the unit sends stdout to both)."""
    print(f"appliance: {message}", flush=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def grow_root() -> None:
    source = sh("findmnt", "--noheadings", "--output", "SOURCE", "/").stdout.strip()
    name = Path(os.path.realpath(source)).name
    disk = sh("lsblk", "--noheadings", "--nodeps", "--output", "PKNAME", f"/dev/{name}").stdout.strip()
    number = Path(f"/sys/class/block/{name}/partition").read_text().strip()
    grown = sh("growpart", f"/dev/{disk}", number, check=False)
    if grown.returncode == 0:
        sh("resize2fs", f"/dev/{name}")
        size = os.statvfs("/")
        say(f"root file system grown to the disk: {size.f_blocks * size.f_frsize / 2**30:.1f} GiB")
    elif "NOCHANGE" not in grown.stdout + grown.stderr:
        say(f"could not grow the root partition: {(grown.stderr or grown.stdout).strip().splitlines()[-1:]}")


def make_secrets() -> None:
    keys = sh("ssh-keygen", "-A").stdout.strip()
    if keys:
        say("created this node's SSH host keys")
    if not API_KEY_FILE.exists():
        API_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(API_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(secrets.token_urlsafe(32) + "\n")
        say(f"created this node's API key in {API_KEY_FILE} (mode 0600, root only)")


def read_site() -> str:
    device = Path(f"/dev/disk/by-partlabel/{CONFIG_PARTLABEL}")
    for _ in range(50):  # udev may still be creating the link this early
        if device.exists():
            break
        time.sleep(0.1)
    else:
        raise SiteError(f"no partition labelled {CONFIG_PARTLABEL} on this node's disks, so no {SITE_FILE}")
    CONFIG_MOUNT.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(CONFIG_MOUNT):
        mounted = sh("mount", "-t", "vfat", "-o", "ro,nodev,nosuid,noexec", str(device), str(CONFIG_MOUNT),
                     check=False)
        if mounted.returncode != 0:
            raise SiteError(f"cannot mount the {CONFIG_PARTLABEL} partition: {mounted.stderr.strip()}")
    path = CONFIG_MOUNT / SITE_FILE
    if not path.is_file():
        raise SiteError(f"the {CONFIG_PARTLABEL} partition has no {SITE_FILE} (site.toml.example beside it "
                        "shows every setting)")
    return path.read_text(errors="replace")


def write_if_changed(path: Path, text: str, mode: int, owner: str, group: str) -> bool:
    if path.exists() and path.read_text() == text:
        os.chmod(path, mode)
        return False
    from appliance.build.common import atomic_output

    with atomic_output(path) as partial:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
        os.chmod(partial, mode)
        sh("chown", f"{owner}:{group}", str(partial))
    return True


def apply_ssh_keys(keys: list[str]) -> None:
    if keys:
        write_if_changed(Path("/root/.ssh/authorized_keys"), "\n".join(keys) + "\n", 0o600, "root", "root")
        os.chmod("/root/.ssh", 0o700)


def check_spec(text: str) -> None:
    """The rendered spec through the appliance's own loader, as the role's `validate:` does: same message."""
    import tempfile

    from appliance.spec import SpecError, load_spec

    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="appliance-spec-") as candidate:
        candidate.write(text)
        candidate.flush()
        try:
            load_spec(Path(candidate.name))
        except SpecError as exc:
            message = str(exc).replace(candidate.name, "the spec made from site.toml")
            raise SiteError(message.splitlines()[0] if message else "the spec made from site.toml is invalid") from None


def apply_site(site: Site) -> None:
    base = json.loads((LIB / "role-vars.json").read_text())
    role_vars = {**base, **site.role_vars(), "appliance_api_keys": [API_KEY_FILE.read_text().strip()]}
    rendered = render_templates(LIB / "templates", role_vars)
    check_spec(rendered["appliance_api/etc/appliance/appliance.toml.j2"])
    unit_changed = False
    for name, text in rendered.items():
        target, mode, owner, group = RENDERED[name]
        group = role_vars["appliance_api_user"] if group == "@api" else group
        changed = write_if_changed(Path(target), text, mode, owner, group)
        unit_changed |= changed and target.endswith(".service")
    write_if_changed(NETWORK_FILE, network_unit(site), 0o644, "root", "root")
    if site.hostname:
        write_if_changed(Path("/etc/hostname"), site.hostname + "\n", 0o644, "root", "root")
        sh("hostname", site.hostname, check=False)
    if unit_changed:  # the API unit is not started yet: this boot starts it with the site's address and port
        sh("systemctl", "daemon-reload")


def setup() -> int:
    STATUS_FILE.parent.mkdir(parents=True, exist_ok=True)
    grow_root()
    make_secrets()
    text = None
    try:
        text = read_site()
        site = parse_site(text)
        apply_ssh_keys(site.authorized_keys)
        apply_site(site)
    except Exception as exc:
        if not isinstance(exc, SiteError):
            exc = SiteError(f"the node could not apply it: {type(exc).__name__}: {exc}")
        keys = ssh_keys_despite_errors(text) if text is not None else []
        if keys:  # so the node stays repairable over SSH
            apply_ssh_keys(keys)
            say(f"applied the {len(keys)} SSH key(s) of {SITE_FILE} anyway, so root can log in to fix this")
        problem = f"site configuration problem: {exc}"
        STATUS_FILE.write_text(json.dumps({"ok": False, "problem": problem}))
        say(f"{problem}. The API stays down: fix {SITE_FILE} on the {CONFIG_PARTLABEL} partition and reboot.")
        return 1
    STATUS_FILE.write_text(json.dumps({"ok": True, "port": site.port, "bind": site.bind_address}))
    say(f"site configuration applied ({SITE_FILE}: API on {site.bind_address}:{site.port}, "
        f"open to {', '.join(site.api_networks) or 'this node only'})")
    return 0


def addresses() -> list[str]:
    try:
        data = json.loads(sh("ip", "-json", "address", "show", "scope", "global").stdout or "[]")
    except (OSError, ValueError, subprocess.CalledProcessError):
        return []
    return [info["local"] for link in data for info in link.get("addr_info", []) if "local" in info]


def ready(deadline_s: float = 900) -> int:
    try:
        status = json.loads(STATUS_FILE.read_text())
    except (OSError, ValueError):
        status = {"ok": False, "problem": "appliance-node-setup did not run"}
    if not status.get("ok"):
        say(f"NOT READY: {status.get('problem')}")
        return 1
    port, bind = status["port"], status["bind"]
    local = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    url = f"http://{local if ':' not in local else f'[{local}]'}:{port}/v1/healthz"
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > end:
            say(f"NOT READY: the API did not answer {url} within {deadline_s:.0f}s; see journalctl -u appliance-api")
            return 1
        time.sleep(2)
    shown = [a for a in addresses() if bind in ("0.0.0.0", "::") or a == bind] or [local]
    say("node ready")
    for address in shown:
        host = f"[{address}]" if ":" in address else address
        say(f"  API     http://{host}:{port}   check: curl http://{host}:{port}/v1/healthz")
        say(f"  SSH     ssh root@{address}   (keys from {SITE_FILE})")
    say(f"  API key {API_KEY_FILE} on this node (mode 0600, root only); clients send it as a Bearer token")
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["setup"]:
        return setup()
    if argv[1:] == ["ready"]:
        return ready()
    print("usage: python -m appliance.node_setup setup|ready", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
