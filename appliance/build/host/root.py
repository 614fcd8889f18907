"""The host image's root file system: the mmdebstrap base with the project's roles applied to it.

The roles run through ansible-playbook (playbooks/host-image.yml) with a chroot connection, against an unpacked
bundle directory of what appliance/bundle.py's gather() chooses: the same packages, wheelhouse and guest image
that `appliance deploy` would install, read from the same role lists. What needs a running system (starting services,
the health check, the node's secrets) the roles skip when appliance_image_build is set; the node does it at boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance import bundle as bundle_mod
from appliance.build.common import REPO_ROOT, BuildError, run
from appliance.build.rootfs import chroot
from appliance.progress import Progress

CONNECTION_DIR = Path(__file__).parent / "ansible_connections"
PLAYBOOK = REPO_ROOT / "playbooks" / "host-image.yml"
NODE_LIB = "usr/lib/appliance-node"
# Role templates the node renders again at boot with the site's values (node_setup.RENDERED reads them there).
NODE_TEMPLATES = (
    "firewall/templates/etc/nftables.conf.j2",
    "appliance_api/templates/etc/appliance/appliance.toml.j2",
    "appliance_api/templates/etc/appliance/api.env.j2",
    "appliance_api/templates/etc/systemd/system/appliance-api.service.j2",
)
ENABLE_UNITS = ("appliance-node-setup.service", "appliance-node-ready.service", "systemd-networkd.service",
                "systemd-networkd-wait-online.service", "serial-getty@ttyS0.service")
# Build leftovers and per-machine identity a node must make itself (machine-id is emptied, not removed).
REMOVE = ("etc/ssh/ssh_host_*", "var/lib/dbus/machine-id", "root/.ansible", "root/.cache", "usr/sbin/policy-rc.d",
          "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/apt/*", "var/log/dpkg.log",
          "var/log/alternatives.log", "tmp/*", "var/tmp/*")


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def bundle_directory(dest: Path, **gather_args: Any) -> dict[str, Any]:
    """An unpacked bundle (the layout `appliance deploy` gives the roles) of what bundle.gather chooses (gather_args
    are its keywords: image_dir, cache_dir, mirror, suite), without the Ansible content: the roles run from this
    source tree.

    Files are hard links into the caches where possible: nothing is packed into a tar only to be unpacked again.
    """
    scratch = dest / ".gather"
    try:
        contents = bundle_mod.gather(scratch, progress=Progress(quiet=True), ansible=False, **gather_args)
    except bundle_mod.BundleError as exc:
        raise BuildError(f"roles: {exc}") from None
    for arcname, path in contents.entries:
        _link_or_copy(path, dest / arcname)
    shutil.rmtree(scratch)
    (dest / bundle_mod.MANIFEST).write_text(json.dumps(contents.manifest, indent=1) + "\n")
    return contents.manifest


def inventory(root: Path) -> str:
    host = {"ansible_connection": "appliance_chroot", "ansible_host": str(root),
            "ansible_python_interpreter": "/usr/bin/python3"}
    return json.dumps({"all": {"children": {"image": {"hosts": {"node-image": host}}}}})


def apply_roles(root: Path, bundle_dir: Path, scratch: Path, verbose: bool = False) -> None:
    """ansible-playbook host-image.yml against the root, with the host's /proc mounted in a private namespace."""
    from appliance.deploy import DeployError, find_ansible_playbook, playbook_argv, playbook_env, read_events, summarize

    try:
        ansible_playbook = find_ansible_playbook()
    except DeployError as exc:
        raise BuildError(f"roles: {exc}") from None
    (scratch / "inventory.json").write_text(inventory(root))
    events = scratch / "events.jsonl"
    env = playbook_env(os.environ, REPO_ROOT, events)
    env["ANSIBLE_CONNECTION_PLUGINS"] = str(CONNECTION_DIR)
    env["ANSIBLE_LOCAL_TEMP"] = str(scratch / "ansible-local")
    env["ANSIBLE_HOME"] = str(scratch / "ansible-home")
    argv = playbook_argv(ansible_playbook, PLAYBOOK, scratch / "inventory.json",
                         {"appliance_bundle_dir": str(bundle_dir)}, check=False, limit=None)
    policy = root / "usr/sbin/policy-rc.d"  # packages installed into the image must not start their services here
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    script = 'mount -t proc proc "$0/proc" && exec "$@"'
    log = scratch / "ansible.log"
    with log.open("w") as output:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(root),
                                 *argv], env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT)
    if verbose:
        sys.stderr.write(log.read_text())
    summary = summarize(read_events(events))
    if result.returncode != 0 or not summary.ok:
        if summary.failures:
            raise BuildError("roles: " + "; ".join(f.line() for f in summary.failures))
        tail = " | ".join(line.strip() for line in log.read_text().splitlines()[-3:] if line.strip())
        raise BuildError(f"roles: ansible-playbook exited with {result.returncode}: {tail[-400:]}")


def install_node_files(root: Path, recipe: Path, roles_dir: Path) -> None:
    """The node's units, the site config example and the role templates the boot-time setup (appliance/node_setup.py,
    in the appliance venv the roles installed) renders with the site's values."""
    shutil.copytree(recipe / "files", root, dirs_exist_ok=True, symlinks=True)
    lib = root / NODE_LIB
    lib.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(recipe / "site.toml.example", lib / "site.toml.example")
    for template in NODE_TEMPLATES:
        role, _, rest = template.partition("/templates/")
        target = lib / "templates" / role / rest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(roles_dir / template, target)
    chroot("roles: enable units", root, ["systemctl", "enable", "--quiet", *ENABLE_UNITS])


def scrub(root: Path) -> None:
    """Remove what identifies the build machine or this build; empty machine-id means `first boot` to systemd."""
    for pattern in REMOVE:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    (root / "etc/machine-id").write_text("")


def write_fstab(root: Path, root_uuid: str) -> None:
    (root / "etc/fstab").write_text(f"# Written by `appliance build host`.\nUUID={root_uuid} / ext4 "
                                    "errors=remount-ro 0 1\n")


def kernel_files(root: Path) -> tuple[str, str]:
    """(kernel, initrd) paths relative to the root: the newest installed kernel."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError("roles: the image has no kernel in /boot (linux-image-amd64 missing from the base?)")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.exists():
        raise BuildError(f"roles: the image has no initrd for kernel {release}")
    return f"boot/{kernels[-1].name}", f"boot/{initrd.name}"


def make_root_ext4(root: Path, image: Path, root_uuid: str, slack_bytes: int = 384 << 20) -> None:
    """An ext4 image of the tree with room for the first boot; the node grows it to its disk."""
    from appliance.build.rootfs import ext4_geometry, tree_usage

    used, inodes = tree_usage(root)
    size, inode_count = ext4_geometry(used + slack_bytes, inodes * 2)
    # GRUB 2.06 cannot read file systems with these newer features; a journal, since this root is written to.
    run("roles: mkfs.ext4", ["mkfs.ext4", "-q", "-F", "-L", "appliance-root", "-U", root_uuid,
                             "-O", "^metadata_csum_seed,^orphan_file", "-N", str(inode_count),
                             "-E", "nodiscard", "-d", root, image, f"{size // 1024}k"])
