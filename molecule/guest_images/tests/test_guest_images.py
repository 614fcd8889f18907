"""The guest image layout an operator finds after converge (the bundle's image) and the side effect (an upgrade to a
second image, a rollback to the first, then a corrupted third one that must be refused): current, previous, nothing
else."""

import json
import os
from pathlib import Path

import pytest

testinfra_hosts = ["all"]

IMAGES = "/var/lib/appliance-images"
ARTIFACTS = ("vmlinuz", "initrd.img", "rootfs.ext4")


@pytest.fixture(scope="module")
def bundle_image_id():
    manifest = Path(os.environ["APPLIANCE_TEST_BUNDLE_DIR"]) / "manifest.json"
    return json.loads(manifest.read_text())["image_id"]


def test_after_the_rollback_current_is_the_bundle_image_and_previous_the_upgrade(host, bundle_image_id):
    current, previous = host.file(f"{IMAGES}/current"), host.file(f"{IMAGES}/previous")
    assert current.is_symlink and current.linked_to == f"{IMAGES}/{bundle_image_id}"
    assert previous.is_symlink and previous.linked_to == f"{IMAGES}/guest-test-second"


def test_the_corrupted_image_was_refused_and_nothing_else_is_kept(host, bundle_image_id):
    names = set(host.check_output(f"ls -A {IMAGES}").split())
    # The refused copy stays hidden as .partial until the next install attempt removes it; it is never switched to.
    assert names - {".guest-test-corrupt.partial"} == {"current", "previous", "guest-test-second", bundle_image_id}


@pytest.mark.parametrize("image", ["guest-test-second", "bundle"])
def test_installed_files_match_their_manifest_and_are_read_only_for_the_service(host, image, bundle_image_id):
    directory = f"{IMAGES}/{bundle_image_id if image == 'bundle' else image}"
    assert host.file(directory).mode == 0o755 and host.file(directory).user == "root"
    manifest = json.loads(host.file(f"{directory}/manifest.json").content_string)
    for name in ARTIFACTS:
        artifact = host.file(f"{directory}/{name}")
        assert artifact.user == "root" and artifact.mode == 0o644
        assert artifact.sha256sum == manifest["artifacts"][name]["sha256"]


def test_the_image_store_is_roots_alone(host):
    """The VMM launcher boots only images from a store that root alone can change (docs/security.md)."""
    store = host.file(IMAGES)
    assert (store.user, store.group, store.mode) == ("root", "root", 0o755)
