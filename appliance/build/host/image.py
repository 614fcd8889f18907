"""Build the host image: a bootable GPT disk that comes up as a ready appliance node.

    build_host_image(spec, output, fmt="raw"|"qcow2", site_config=None, ...) -> HostImage

Stages, each cached under <cache_dir>/stages/ and rebuilt only when its inputs change:

    base    mmdebstrap of image-builder/host/packages.txt (the operating system only)      ~1 min
    root    the roles applied to the base (playbooks/host-image.yml), the node's boot-time setup, ext4
            key: base, roles + playbooks, the appliance source, the guest image, the host recipe, this code
    disk    GRUB for UEFI and BIOS, the ESP and config partitions (mtools), the GPT disk; always made, seconds

The output is written beside its final name and renamed into place; <output>.manifest.json describes it (package
versions, the guest image's sha256, the disk's sha256). The same manifest, less the disk's digest, is inside the
image at /usr/lib/appliance-node/manifest.json.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import bundle as bundle_mod
from appliance import host_tools, node_setup
from appliance.build import rootfs
from appliance.build.apt import Apt
from appliance.build.common import (
    RECIPE_DIR,
    REPO_ROOT,
    BuildError,
    atomic_output,
    exclusive,
    read_list,
    remove_leftovers,
    run,
    sha256_file,
    sha256_json,
    tree_hash,
)
from appliance.build.host import disk, root
from appliance.progress import Progress
from appliance.spec import ApplianceSpec

HOST_RECIPE = RECIPE_DIR / "host"
FORMATS = ("raw", "qcow2")
MANIFEST_FORMAT = 1
KERNEL_CMDLINE = "console=tty0 console=ttyS0,115200n8"
# Host tools the build runs -> the Debian package that has each (a view of the one table).
HOST_TOOLS = host_tools.programs("host-image")
# The appliance's own source: it becomes the wheel the roles install, so a change to it is a new root stage.
SOURCE_PATHS = ("pyproject.toml", "appliance", "service", "image-builder/guest/agent")


@dataclass(frozen=True)
class HostImage:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    cached_root: bool


def preflight_problem(
    euid: int, which: Callable[[str], str | None], fmt: str, matches: Callable[[str], bool] = host_tools.matches
) -> str | None:
    if fmt not in FORMATS:
        return f"build host: unknown format {fmt!r}; choose raw or qcow2"
    if euid != 0:
        return "build host: building the host image needs root (mmdebstrap --mode=root, chroot)"
    missing = sorted({package for tool, package in HOST_TOOLS.items() if which(tool) is None})
    if missing:
        return f"build host: missing host tools; install the Debian packages: {' '.join(missing)}"
    for entry in host_tools.data("host-image"):  # GRUB's module directories
        if not matches(entry.path):
            return f"build host: no {entry.what}; install the Debian package {entry.package}"
    return None


def check_site_config(path: Path | None) -> str | None:
    """The site config's text after the node's own checks (so a bad file fails the build, not the node's boot)."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        raise BuildError(f"build host: cannot read the site config {path}: {exc.strerror}") from None
    try:
        node_setup.parse_site(text)
    except node_setup.SiteError as exc:
        raise BuildError(f"build host: {path}: {exc}") from None
    return text


def recipe_hash() -> str:
    """What shapes the root stage besides the base: the host recipe, the roles, the playbooks, root.py and the
    chroot connection (disk.py and this driver only shape the disk stage, which is always made)."""
    here = Path(__file__).parent
    return tree_hash([HOST_RECIPE, REPO_ROOT / "roles", REPO_ROOT / "playbooks", REPO_ROOT / "ansible.cfg",
                      here / "root.py", here / "ansible_connections"])


def root_stage_key(base: Path, guest_manifest_sha: str) -> str:
    return sha256_json({"base": base.name, "recipe": recipe_hash(), "guest": guest_manifest_sha,
                        "source": tree_hash([REPO_ROOT / p for p in SOURCE_PATHS])})


def build_host_image(
    spec: ApplianceSpec,
    output: Path,
    *,
    fmt: str = "raw",
    site_config: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    verbose: bool = False,
) -> HostImage:
    progress = progress or Progress(quiet=True)
    problem = preflight_problem(os.geteuid(), shutil.which, fmt)
    if problem:
        raise BuildError(problem)
    site_text = check_site_config(site_config)
    started = time.monotonic()
    cache = spec.paths.cache_dir
    guest = spec.guest

    from appliance.build.guest import build_guest_image

    with progress.phase("guest image", "the image sandboxes boot from, placed inside the node"):
        guest_dir = build_guest_image(spec, progress=Progress(quiet=True))
    guest_manifest_sha = sha256_file(guest_dir / "manifest.json")

    packages = read_list(HOST_RECIPE / "packages.txt")
    sources = Apt.sources(guest.mirror, guest.suite)
    with progress.phase("base", f"mmdebstrap {guest.suite}, {len(packages)} packages"):
        base = rootfs.base_stage(guest.suite, sources, packages, read_list(HOST_RECIPE / "dpkg-options.txt"),
                                 cache, refresh=False)

    key = root_stage_key(base, guest_manifest_sha)[:16]
    stages = cache / "stages"
    root_image = stages / f"host-root-{key}.ext4"
    root_info = stages / f"host-root-{key}.json"
    with exclusive(stages / f"host-root-{key}.lock"):
        cached = root_image.exists() and root_info.exists() and not force
        if cached:
            progress.skip("root", f"cached ({root_image.name})")
        else:
            _build_root(spec, base, guest_dir, root_image, root_info, progress, verbose)
    info = json.loads(root_info.read_text())
    prune_root_stages(stages, keep=root_image)

    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output.parent, f".{output.name}.work-*")
    work = output.parent / f".{output.name}.work-{os.getpid()}"
    work.mkdir()
    manifest_path = output.with_name(output.name + ".manifest.json")
    try:
        with atomic_output(output) as final:
            with progress.phase("disk", f"GPT, GRUB for UEFI and BIOS, {fmt}"):
                raw = final if fmt == "raw" else work / "disk.raw"
                _assemble(work, raw, root_image, info, site_text)
                if fmt == "qcow2":
                    run("disk: qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, final])
                    raw.unlink()
            with progress.phase("manifest", "sha256 of the disk"):
                manifest = {**info["manifest"], "format": MANIFEST_FORMAT, "image_format": fmt,
                            "disk": {"sha256": sha256_file(final), "size": final.stat().st_size,
                                     "allocated": final.stat().st_blocks * 512, "virtual_size": info["layout_bytes"]},
                            "site_config": site_config is not None, "root_stage_cached": cached,
                            "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                            "build_seconds": round(time.monotonic() - started, 1)}
        with atomic_output(manifest_path) as partial:
            partial.write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return HostImage(output, manifest_path, manifest, cached)


def prune_root_stages(stages: Path, keep: Path, keep_count: int = 2) -> list[Path]:
    """Remove all but the newest `keep_count` root stages (each is 1.4 GB), never `keep` nor one whose lock another
    build holds; returns what went."""
    images = sorted(stages.glob("host-root-*.ext4"), key=lambda path: path.stat().st_mtime, reverse=True)
    removed = []
    for image in images[keep_count:]:
        if image == keep:
            continue
        lock = image.with_suffix(".lock")
        with exclusive(lock, wait=False) as held:
            if not held:
                continue
            image.unlink(missing_ok=True)
            image.with_suffix(".json").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        removed.append(image)
    return removed


def _build_root(spec: ApplianceSpec, base: Path, guest_dir: Path, root_image: Path, root_info: Path,
                progress: Progress, verbose: bool) -> None:
    from appliance.build.guest import read_manifest

    stages = root_image.parent
    remove_leftovers(stages, "host-root-work-*")
    work = stages / f"host-root-work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        tree = work / "root"
        with progress.phase("root: unpack base"):
            rootfs.unpack_base(base, tree)
        with progress.phase("root: bundle", "host packages, wheelhouse, guest image (appliance/bundle.py)"):
            bundle_manifest = root.bundle_directory(work / "bundle", image_dir=guest_dir,
                                                    cache_dir=spec.paths.cache_dir, mirror=spec.guest.mirror,
                                                    suite=spec.guest.suite)
        with progress.phase("root: roles", "playbooks/host-image.yml in the image root"):
            root.apply_roles(tree, work / "bundle", work, verbose=verbose)
        shutil.rmtree(work / "bundle")
        with progress.phase("root: node setup", "boot-time setup, units, role templates"):
            root.install_node_files(tree, HOST_RECIPE, REPO_ROOT / "roles")
            root_uuid = str(uuid.UUID(sha256_json([root_image.name])[:32]))
            kernel, initrd = root.kernel_files(tree)
            root.write_fstab(tree, root_uuid)
            (tree / "boot/grub").mkdir(parents=True, exist_ok=True)
            (tree / "boot/grub/grub.cfg").write_text(disk.grub_cfg(root_uuid, kernel, initrd, KERNEL_CMDLINE))
            root.scrub(tree)
            debian = rootfs.parse_dpkg_query(rootfs.dpkg_query(tree))
            try:  # the roles installed the bundle's QEMU (>= 10); an image that could not run the engine is no image
                bundle_mod.check_minimum_versions(debian)
            except bundle_mod.BundleError as exc:
                raise BuildError(f"roles: {exc}") from None
            guest_manifest = read_manifest(guest_dir)
            manifest = {
                "recipe_hash": recipe_hash(),
                "kernel": {"file": kernel, "initrd": initrd, "cmdline": KERNEL_CMDLINE},
                "root_uuid": root_uuid,
                "debian_packages": dict(sorted(debian.items())),
                "appliance_version": bundle_manifest["appliance_version"],
                "wheels": sorted(name.removeprefix("wheels/") for name in bundle_manifest["files"]
                                 if name.startswith("wheels/")),
                "guest_image": {"id": guest_dir.name, "manifest_sha256": sha256_file(guest_dir / "manifest.json"),
                                "artifacts": guest_manifest["artifacts"]},
            }
            (tree / root.NODE_LIB / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with progress.phase("root: mkfs.ext4"), atomic_output(root_image) as partial:
            root.make_root_ext4(tree, partial, root_uuid)
        with atomic_output(root_info) as partial:
            partial.write_text(json.dumps({"manifest": manifest, "root_uuid": root_uuid,
                                           "layout_bytes": disk.plan_layout(root_image.stat().st_size).total_bytes},
                                          indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _assemble(work: Path, raw: Path, root_image: Path, info: dict[str, Any], site_text: str | None) -> None:
    early = work / "early.cfg"
    early.write_text(disk.early_config(info["root_uuid"]))
    efi, core = work / "BOOTX64.EFI", work / "core.img"
    disk.grub_mkimage("x86_64-efi", efi, early)
    disk.grub_mkimage("i386-pc", core, early)
    esp = work / "esp.fat"
    disk.make_fat(esp, 32, "EFI", {"EFI/BOOT/BOOTX64.EFI": efi})
    config_files = {"site.toml.example": HOST_RECIPE / "site.toml.example"}
    if site_text is not None:
        (work / "site.toml").write_text(site_text)
        config_files["site.toml"] = work / "site.toml"
    config = work / "config.fat"
    disk.make_fat(config, 16, "APPLCONFIG", config_files)
    layout = disk.plan_layout(root_image.stat().st_size)
    disk.assemble(raw, layout, {"EFI system": esp, disk.CONFIG_LABEL: config, disk.ROOT_LABEL: root_image},
                  disk.GRUB_DIR / "i386-pc" / "boot.img", core)
