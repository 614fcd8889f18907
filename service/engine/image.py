"""A built guest image on disk: the files a VM boots from, checked before use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageNotFound

KERNEL, INITRD, ROOTFS, MANIFEST = "vmlinuz", "initrd.img", "rootfs.ext4", "manifest.json"


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest_file = directory / MANIFEST
        if not manifest_file.is_file():
            raise ImageNotFound(f"no guest image at {directory} (run 'appliance build guest')")
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError as exc:
            raise ImageNotFound(f"{manifest_file} is not valid JSON ({exc}); rebuild with --force") from None
        if "kernel_cmdline" not in manifest:
            raise ImageNotFound(f"{manifest_file} has no kernel_cmdline; rebuild with 'appliance build guest --force'")
        for name in (KERNEL, INITRD, ROOTFS):
            if not (directory / name).is_file():
                raise ImageNotFound(
                    f"guest image {directory} lacks {name}; rebuild with 'appliance build guest --force'"
                )
        return cls(directory, manifest)

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS

    @property
    def kernel_args(self) -> str:
        return str(self.manifest["kernel_cmdline"])

    @property
    def image_id(self) -> str:
        """Identifies the bytes a VM boots from (what saved state must be restored onto): the artifacts' hashes."""
        artifacts = self.manifest.get("artifacts", {})
        digests = "".join(artifacts.get(name, {}).get("sha256", "?") for name in (KERNEL, INITRD, ROOTFS))
        return hashlib.sha256(digests.encode()).hexdigest()[:16]
