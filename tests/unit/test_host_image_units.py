"""Fast tests of the host image's pure parts: the disk layout and boot sector patches, the node's site config
checks (appliance/node_setup.py) and the rendering of the roles' templates, the build's refusals. No VM, no build;
the boot tests are in tests/hostimage/."""

from __future__ import annotations

import importlib.util
import itertools
import struct
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance import node_setup
from appliance.build.common import REPO_ROOT, BuildError, exclusive
from appliance.build.host import disk
from appliance.build.host.image import check_site_config, preflight_problem, prune_root_stages
from appliance.build.host.root import NODE_TEMPLATES
from appliance.cli import main as cli

EXAMPLE = REPO_ROOT / "image-builder" / "host" / "site.toml.example"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvNXTnbYmS7C2F0H8oJ1nPz2xnc9u8N5Kq3jQ8uJ3vH admin@example"


# --- disk ---------------------------------------------------------------------------------------------------------


def test_layout_is_aligned_and_ends_with_the_root() -> None:
    layout = disk.plan_layout(root_bytes=1_500_000_000)
    parts = layout.partitions
    assert [p.name for p in parts] == ["bios-boot", "EFI system", "appliance-config", "appliance-root"]
    for part in parts:
        assert part.start % 2048 == 0 and part.size % 2048 == 0  # 1 MiB aligned
    for before, after in itertools.pairwise(parts):
        assert before.start + before.size == after.start
    root = parts[-1]
    assert root.size * 512 >= 1_500_000_000
    assert layout.total_bytes == (root.start + root.size + 2048) * 512  # room for the backup GPT
    script = disk.sfdisk_script(layout)
    assert "label: gpt" in script and f"type={disk.BIOS_BOOT}" in script and 'name="appliance-config"' in script


def test_boot_sector_points_at_core_and_keeps_the_partition_table() -> None:
    mbr = bytes(range(256)) * 2
    boot_img = b"\xeb\x63" + b"\x11" * 510
    patched = disk.patch_boot_sector(mbr, boot_img, core_lba=2048)
    assert len(patched) == 512
    assert patched[440:] == mbr[440:]  # disk signature, partition table, 0x55AA
    assert struct.unpack_from("<Q", patched, disk.BOOT_KERNEL_SECTOR)[0] == 2048
    assert patched[disk.BOOT_DRIVE] == 0xFF and patched[disk.BOOT_DRIVE_CHECK:disk.BOOT_DRIVE_CHECK + 2] == b"\x90\x90"
    assert patched[:2] == b"\xeb\x63"


def test_core_image_blocklist_names_the_sectors_after_its_first() -> None:
    core = b"\x22" * (512 * 40 + 100)  # 41 sectors once padded
    patched = disk.patch_core_image(core, core_lba=2048)
    assert len(patched) == 41 * 512
    start, count, segment = disk.BLOCKLIST.unpack_from(patched, 512 - disk.BLOCKLIST.size)
    assert (start, count, segment) == (2049, 40, 0x820)
    assert disk.BLOCKLIST.unpack_from(patched, 512 - 2 * disk.BLOCKLIST.size) == (0, 0, 0)


def test_grub_config_boots_the_root_by_uuid() -> None:
    cfg = disk.grub_cfg("1234-uuid", "boot/vmlinuz-6.1", "boot/initrd.img-6.1", "console=ttyS0")
    assert "linux /boot/vmlinuz-6.1 root=UUID=1234-uuid ro console=ttyS0" in cfg
    assert "search --no-floppy --fs-uuid --set=root 1234-uuid" in disk.early_config("1234-uuid")


# --- the node's site config ---------------------------------------------------------------------------------------


def test_the_documented_example_is_a_valid_site_config() -> None:
    site = node_setup.parse_site(EXAMPLE.read_text())
    assert site.network_mode == "dhcp" and site.api_networks == [] and site.port == 8080


def test_a_full_site_config_maps_onto_the_role_variables() -> None:
    site = node_setup.parse_site(f"""
[node]
hostname = "appliance-7"
[network]
mode = "static"
address = "192.0.2.10/24"
gateway = "192.0.2.1"
dns = ["192.0.2.53"]
[ssh]
authorized_keys = ["{KEY}"]
allowed_networks = ["198.51.100.0/24"]
[api]
bind_address = "0.0.0.0"
port = 9090
allowed_networks = ["192.0.2.0/24", "2001:db8::/32"]
[sandboxes]
pool_size = 0
boot_timeout_s = 120
accelerator = "kvm"
""")
    assert site.role_vars() == {
        "appliance_api_bind_address": "0.0.0.0", "appliance_api_port": 9090, "firewall_api_port": 9090,
        "firewall_api_sources": ["192.0.2.0/24", "2001:db8::/32"], "firewall_ssh_sources": ["198.51.100.0/24"],
        "appliance_api_pool_size": 0, "appliance_api_boot_timeout_s": 120.0, "appliance_api_accelerator": "kvm",
    }
    network = node_setup.network_unit(site)
    assert "Address=192.0.2.10/24" in network and "Gateway=192.0.2.1" in network and "DNS=192.0.2.53" in network


@pytest.mark.parametrize(("text", "message"), [
    ("[api]\nallowed_networks = [\"10.0.0.0/33\"]",
     "api.allowed_networks[0]: '10.0.0.0/33' is not an IPv4 or IPv6 network"),
    ("[api]\nport = 22", "api.port: 22 is not a TCP port"),
    ("[api]\nport = \"8080\"", "api.port: '8080' is not a TCP port"),
    ("[apii]\nport = 1", "unknown section [apii]"),
    ("[api]\nallowed = []", "unknown key api.allowed"),
    ("[network]\nmode = \"static\"", "network.address is required"),
    ("[network]\naddress = \"192.0.2.1/24\"", "network.address needs network.mode = \"static\""),
    ("[ssh]\nauthorized_keys = [\"hello\"]", "ssh.authorized_keys[0] is not an OpenSSH public key line"),
    ("[ssh]\nallowed_networks = []", "ssh.allowed_networks is empty"),
    ("[sandboxes]\npool_size = -1", "sandboxes.pool_size: -1 must be an integer >= 0"),
    ("[sandboxes]\naccelerator = \"fast\"", "sandboxes.accelerator: 'fast' is not one of auto, kvm, tcg"),
    ("[api\n", "not valid TOML"),
])
def test_a_bad_site_config_names_the_key_and_the_fix(text: str, message: str) -> None:
    with pytest.raises(node_setup.SiteError) as raised:
        node_setup.parse_site(text)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_roles_templates_render_with_the_site_laid_over_the_role_defaults(tmp_path: Path) -> None:
    templates = tmp_path / "templates"

    for template in NODE_TEMPLATES:
        role, _, rest = template.partition("/templates/")
        (templates / role / rest).parent.mkdir(parents=True, exist_ok=True)
        (templates / role / rest).write_text((REPO_ROOT / "roles" / template).read_text())
    # The roles' own plain defaults and vars (what role-vars.json records at build time), and for the few whose
    # default is an expression, the value it has in an image build.
    role_vars: dict = {}
    for file in ("appliance_api/defaults", "appliance_api/vars", "firewall/defaults"):
        loaded = yaml.safe_load((REPO_ROOT / "roles" / file / "main.yml").read_text())
        role_vars.update({k: v for k, v in loaded.items() if not (isinstance(v, str) and "{{" in v)})
    role_vars.update({"appliance_api_images_dir": "/var/lib/appliance/images",
                      "appliance_api_run_dir": "/run/appliance", "firewall_api_port": 8080})
    site = node_setup.parse_site('[api]\nport = 9090\nallowed_networks = ["192.0.2.0/24", "2001:db8::/32"]\n'
                                 "[sandboxes]\npool_size = 0\n")
    rendered = node_setup.render_templates(templates, {**role_vars, **site.role_vars(),
                                                       "appliance_api_keys": ["k" * 20]})
    nft = rendered["firewall/etc/nftables.conf.j2"]
    assert "ip saddr { 192.0.2.0/24 } tcp dport 9090 accept" in nft
    assert "ip6 saddr { 2001:db8::/32 } tcp dport 9090 accept" in nft
    spec = tomllib.loads(rendered["appliance_api/etc/appliance/appliance.toml.j2"])
    assert spec["service"]["port"] == 9090 and spec["service"]["pool_size"] == 0
    assert "--port 9090" in rendered["appliance_api/etc/systemd/system/appliance-api.service.j2"]
    assert rendered["appliance_api/etc/appliance/api.env.j2"].splitlines()[-1] == "APPLIANCE_API_KEYS=" + "k" * 20
    node_setup.check_spec(rendered["appliance_api/etc/appliance/appliance.toml.j2"])  # the appliance accepts it


def test_valid_ssh_keys_apply_even_when_the_rest_is_malformed() -> None:
    text = f'[ssh]\nauthorized_keys = ["{KEY}"]\n[api]\nport = 22\n'
    with pytest.raises(node_setup.SiteError):
        node_setup.parse_site(text)
    assert node_setup.ssh_keys_despite_errors(text) == [KEY]
    assert node_setup.ssh_keys_despite_errors('[ssh]\nauthorized_keys = ["nope"]\n') == []
    assert node_setup.ssh_keys_despite_errors("[ssh\n") == []


def test_a_spec_the_appliance_refuses_is_a_site_error() -> None:
    with pytest.raises(node_setup.SiteError, match="boot_timeout_s"):
        node_setup.check_spec("[engine]\nboot_timeout_s = 100000\n")


def test_the_node_units_run_the_setup_module_from_the_appliance_venv() -> None:
    units = REPO_ROOT / "image-builder" / "host" / "files" / "etc" / "systemd" / "system"
    for unit, command in (("appliance-node-setup.service", "setup"), ("appliance-node-ready.service", "ready")):
        exec_start = next(line for line in (units / unit).read_text().splitlines() if line.startswith("ExecStart="))
        python, flag, module, argument = exec_start.removeprefix("ExecStart=").split()
        assert (python, flag, argument) == ("/opt/appliance/venv/bin/python", "-m", command)
        found = importlib.util.find_spec(module)
        assert found is not None and found.origin == str(REPO_ROOT / "appliance" / "node_setup.py")


# --- the build's refusals -----------------------------------------------------------------------------------------


def test_preflight_names_what_is_missing() -> None:
    assert "unknown format 'vmdk'" in preflight_problem(0, lambda tool: "/bin/x", "vmdk")
    assert "needs root" in preflight_problem(1000, lambda tool: "/bin/x", "raw")
    problem = preflight_problem(0, lambda tool: None if tool == "mcopy" else "/bin/x", "raw")
    assert problem == "build host: missing host tools; install the Debian packages: mtools"
    problem = preflight_problem(0, lambda tool: "/bin/x", "raw", matches=lambda path: "i386-pc" not in path)
    assert problem == "build host: no GRUB modules for i386-pc; install the Debian package grub-pc-bin"
    assert preflight_problem(0, lambda tool: "/bin/x", "raw", matches=lambda path: True) is None


def test_a_bad_site_config_fails_the_build_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text('[api]\nallowed_networks = ["nope"]\n')
    with pytest.raises(BuildError, match=r"site.toml: api.allowed_networks\[0\]: 'nope' is not an IPv4"):
        check_site_config(bad)
    with pytest.raises(BuildError, match="cannot read the site config"):
        check_site_config(tmp_path / "absent.toml")


def test_cli_refuses_a_bad_format_and_a_bad_site_config_without_a_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "host", "--format", "vmdk"])
    assert result.exit_code == 2 and "vmdk" in result.output
    bad = tmp_path / "site.toml"
    bad.write_text("[api]\nport = 22\n")
    result = runner.invoke(cli, ["build", "host", "-q", "-o", str(tmp_path / "n.img"), "--site-config", str(bad)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "api.port: 22 is not a TCP port" in lines[0], result.output


def test_old_root_stages_are_pruned_but_never_the_one_in_use(tmp_path: Path) -> None:
    import os

    stages = []
    for age, name in enumerate(["a", "b", "c", "d"]):
        image = tmp_path / f"host-root-{name}.ext4"
        image.write_bytes(b"x")
        (tmp_path / f"host-root-{name}.json").write_text("{}")
        os.utime(image, (1000 - age * 100, 1000 - age * 100))  # a newest, d oldest
        stages.append(image)
    with exclusive(tmp_path / "host-root-b.lock"):  # a build that uses b holds its lock: b stays
        removed = prune_root_stages(tmp_path, keep=stages[3], keep_count=1)
    assert removed == [stages[2]]
    assert sorted(p.name for p in tmp_path.glob("*.ext4")) == ["host-root-a.ext4", "host-root-b.ext4",
                                                               "host-root-d.ext4"]
    assert not (tmp_path / "host-root-c.json").exists()
