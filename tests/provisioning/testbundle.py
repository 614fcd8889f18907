"""A bundle for the provisioning tests, built with the real `appliance bundle` code and unpacked.

Uses the guest image the current spec builds when it exists (the full-site scenario boots sandboxes from it);
otherwise a tiny stand-in image, enough for every role but useless for booting (tests that boot say so and skip).

    python -m tests.provisioning.testbundle     # build, print the unpacked directory (for `molecule test` by hand)

APPLIANCE_TEST_BUNDLE=FILE tests a bundle that already exists (a release candidate) instead of building one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from appliance.bundle import create_bundle, file_record, unpack_bundle
from appliance.progress import Progress
from appliance.spec import load_spec

STAND_IN_MARKER = "stand_in"


def test_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "appliance" / "testbundle"


def stand_in_image(directory: Path, image_id: str = "guest-test-stand-in", payload: bytes = b"") -> Path:
    """A small image with the real layout and a manifest whose digests match; it does not boot."""
    image = directory / image_id
    image.mkdir(parents=True, exist_ok=True)
    for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
        (image / name).write_bytes(f"stand-in {name} {image_id}\n".encode() + payload)
    manifest = {"format": 1, "spec_hash": image_id, STAND_IN_MARKER: True, "kernel_cmdline": "console=ttyS0",
                "artifacts": {name: file_record(image / name) for name in ("vmlinuz", "initrd.img", "rootfs.ext4")}}
    (image / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return image


def real_image_dir() -> Path | None:
    try:
        from appliance.build.guest import is_complete
        from appliance.spec import guest_image_dir
    except ImportError:
        return None
    image = guest_image_dir(load_spec())
    return image if is_complete(image) else None


def build(quiet: bool = True) -> tuple[Path, Path, bool]:
    """(bundle file, unpacked directory, whether the image is a real, bootable one)."""
    root = test_dir()
    root.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("APPLIANCE_TEST_BUNDLE")
    if given:
        tar = Path(given)
    else:
        spec = load_spec()
        image = real_image_dir() or stand_in_image(root / "stand-in-image")
        tar = root / "bundle.tar"
        create_bundle(tar, image_dir=image, cache_dir=spec.paths.cache_dir, mirror=spec.guest.mirror,
                      suite=spec.guest.suite, progress=Progress(quiet=quiet))
    unpacked = root / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    manifest = unpack_bundle(tar, unpacked)
    image_manifest = json.loads((unpacked / "images" / manifest["image_id"] / "manifest.json").read_text())
    return tar, unpacked, not image_manifest.get(STAND_IN_MARKER, False)


if __name__ == "__main__":
    _, directory, bootable = build(quiet=False)
    if not bootable:
        print("note: no built guest image; the bundle holds a stand-in that cannot boot", file=sys.stderr)
    print(directory)
