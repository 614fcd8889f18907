"""Image builders: the guest image (kernel, initramfs, root filesystem) for the sandbox microVMs."""

from appliance.build.common import BuildError
from appliance.build.guest import build_guest_image

__all__ = ["BuildError", "build_guest_image"]
