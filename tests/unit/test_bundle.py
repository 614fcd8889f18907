"""The bundle's pure pieces and its write/verify/unpack round trip, with tiny real .debs and a stand-in image."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance import bundle
from appliance.bundle import BundleError, Deb
from appliance.progress import Progress
from tests.provisioning.testbundle import stand_in_image

PROJECT = Path(__file__).resolve().parents[2]


def test_simulated_install_lists_the_whole_closure_with_epochs_and_arches():
    output = "\n".join(
        [
            "NOTE: This is only a simulation!",
            "Inst libc6 (2.36-9+deb12u14 Debian:12.13/stable [amd64])",
            "Inst zlib1g [1:1.2.12-1] (1:1.2.13.dfsg-1 Debian:12.13/stable [amd64])",
            "Inst qemu-system-data (1:7.2+dfsg-7+deb12u18 Debian-Security:12/stable-security [all])",
            "Conf libc6 (2.36-9+deb12u14 Debian:12.13/stable [amd64])",
        ]
    )
    debs = bundle.parse_simulated_install(output)
    assert debs == [
        Deb("libc6", "2.36-9+deb12u14", "amd64"),
        Deb("qemu-system-data", "1:7.2+dfsg-7+deb12u18", "all"),
        Deb("zlib1g", "1:1.2.13.dfsg-1", "amd64"),
    ]
    assert debs[2].filename == "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb"


def test_packages_stanza_is_what_dpkg_scanpackages_writes():
    stanza = bundle.packages_stanza(
        "Package: foo\nVersion: 1.0\nDescription: x\n y\n",
        "foo_1.0_all.deb",
        42,
        {"md5": "m", "sha1": "s1", "sha256": "s256"},
    )
    assert stanza == (
        "Package: foo\nVersion: 1.0\nDescription: x\n y\nFilename: ./foo_1.0_all.deb\nSize: 42\n"
        "MD5sum: m\nSHA1: s1\nSHA256: s256\n"
    )


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "./debs/x", "debs//x", ""])
def test_unsafe_member_names_are_refused(name):
    with pytest.raises(BundleError, match="unsafe path"):
        bundle.check_member_name(name)


def test_the_roles_name_every_host_package():
    packages = bundle.role_packages(PROJECT / "roles")
    assert {"qemu-system-x86", "qemu-utils", "nftables", "python3-venv"} <= set(packages)


def test_a_package_list_that_is_not_a_list_of_names_is_refused(tmp_path):
    defaults = tmp_path / "roles" / "broken" / "defaults"
    defaults.mkdir(parents=True)
    (defaults / "main.yml").write_text("broken_packages: qemu\n")
    with pytest.raises(BundleError, match="broken_packages must be a list"):
        bundle.role_packages(tmp_path / "roles")


# --- a small real bundle ------------------------------------------------------------------------------------------


def _tiny_deb(directory: Path, name: str, version: str = "1.0") -> Path:
    root = directory / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.invalid>\n"
        "Description: test package\n a package for the bundle tests\n"
    )
    deb = directory / f"{name}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.fixture
def project(tmp_path) -> Path:
    project = tmp_path / "project"
    (project / "roles" / "demo" / "defaults").mkdir(parents=True)
    (project / "roles" / "demo" / "defaults" / "main.yml").write_text("demo_packages: [demo-a, demo-b]\n")
    (project / "roles" / "demo" / "tasks").mkdir()
    (project / "roles" / "demo" / "tasks" / "main.yml").write_text("---\n")
    (project / "playbooks").mkdir()
    (project / "playbooks" / "site.yml").write_text("---\n")
    (project / "ansible.cfg").write_text("[defaults]\n")
    return project


def _create(output: Path, image: Path, cache_dir: Path, project: Path, **fetchers) -> dict:
    """create_bundle with this module's stand-in mirror and suite, quietly, from the test project."""
    return bundle.create_bundle(output, image_dir=image, cache_dir=cache_dir, mirror="m", suite="s",
                                progress=Progress(quiet=True), project_dir=project, **fetchers)


def _fetchers(tmp_path: Path, asked: list[list[str]]) -> dict:
    """Stand-ins for apt and pip: tiny real .debs of the packages asked for (made once, then cached), one fake
    wheel."""
    debs_dir = tmp_path / "debs"
    debs_dir.mkdir(exist_ok=True)

    def fetch_debs(packages, mirror, suite, cache_dir):
        asked.append(packages)
        return [next(debs_dir.glob(f"{name}_*.deb"), None) or _tiny_deb(debs_dir, name) for name in packages]

    def fetch_wheels(project_dir, cache_dir, dest):
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "appliance-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"not really a wheel")
        return [wheel]

    return {"fetch_debs": fetch_debs, "fetch_wheels": fetch_wheels}


@pytest.fixture
def built(tmp_path, project) -> tuple[Path, dict]:
    image = stand_in_image(tmp_path / "images", "guest-0123456789abcdef")
    asked: list[list[str]] = []
    output = tmp_path / "out" / "bundle.tar"
    manifest = _create(output, image, tmp_path / "cache", project, **_fetchers(tmp_path, asked))
    assert asked == [["demo-a", "demo-b"]]
    return output, manifest


def test_the_host_image_gets_what_a_bundle_holds_but_the_ansible_content(built, tmp_path, project):
    from appliance.build.host.root import bundle_directory

    _, bundled = built
    image = tmp_path / "images" / "guest-0123456789abcdef"
    dest = tmp_path / "image-bundle"
    unpacked = bundle_directory(dest, image_dir=image, cache_dir=tmp_path / "cache", mirror="m", suite="s",
                                project_dir=project, **_fetchers(tmp_path, []))
    expected = {name: record for name, record in bundled["files"].items() if not name.startswith("ansible/")}
    assert unpacked["files"] == expected and any(name.startswith("ansible/") for name in bundled["files"])
    on_disk = {str(path.relative_to(dest)) for path in dest.rglob("*") if path.is_file()}
    assert on_disk == {*expected, bundle.MANIFEST}  # the layout deploy unpacks, nothing of the gathering left
    assert json.loads((dest / bundle.MANIFEST).read_text()) == unpacked
    assert {k: unpacked[k] for k in ("image_id", "host_packages")} == {k: bundled[k] for k in ("image_id",
                                                                                              "host_packages")}


def test_bundle_holds_the_layout_with_the_manifest_first(built):
    output, manifest = built
    with tarfile.open(output) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json"
    assert set(names[1:]) == set(manifest["files"])
    assert {
        "debs/Packages",
        "debs/demo-a_1.0_all.deb",
        "wheels/appliance-0.1.0-py3-none-any.whl",
        "images/guest-0123456789abcdef/rootfs.ext4",
        "images/guest-0123456789abcdef/manifest.json",
        "ansible/ansible.cfg",
        "ansible/playbooks/site.yml",
        "ansible/roles/demo/tasks/main.yml",
    } <= set(names)
    assert manifest["image_id"] == "guest-0123456789abcdef"
    assert manifest["host_packages"] == ["demo-a", "demo-b"]
    assert not list(output.parent.glob(".*partial*"))


def test_packages_index_lets_apt_find_each_deb(built, tmp_path):
    output, _ = built
    bundle.unpack_bundle(output, tmp_path / "unpacked")
    index = (tmp_path / "unpacked" / "debs" / "Packages").read_text()
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines() if ": " in line) for s in index.split("\n\n")]
    assert [s["Package"] for s in stanzas] == ["demo-a", "demo-b"]
    first = tmp_path / "unpacked" / "debs" / stanzas[0]["Filename"]
    assert bundle.file_record(first)["sha256"] == stanzas[0]["SHA256"]
    assert int(stanzas[0]["Size"]) == first.stat().st_size


def test_verify_accepts_an_intact_bundle_and_unpack_restores_every_file(built, tmp_path):
    output, manifest = built
    assert bundle.verify_bundle(output) == manifest
    dest = tmp_path / "unpacked"
    bundle.unpack_bundle(output, dest)
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    for name, record in manifest["files"].items():
        assert bundle.file_record(dest / name)["sha256"] == record["sha256"]


def test_a_flipped_byte_is_named(built):
    output, _ = built
    with tarfile.open(output) as tar:
        member = tar.getmember("images/guest-0123456789abcdef/rootfs.ext4")
    with output.open("r+b") as stream:
        stream.seek(member.offset_data)
        first = stream.read(1)
        stream.seek(member.offset_data)
        stream.write(bytes([first[0] ^ 1]))
    with pytest.raises(BundleError, match=r"images/guest-0123456789abcdef/rootfs.ext4: checksum mismatch"):
        bundle.verify_bundle(output)


def _rewrite(
    source: Path,
    target: Path,
    *,
    drop: str | None = None,
    add: tuple[str, bytes] | None = None,
    manifest_last: bool = False,
    symlink: str | None = None,
) -> Path:
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        members = [m for m in old.getmembers() if m.name != drop]
        if manifest_last:
            members = members[1:] + members[:1]
        for member in members:
            new.addfile(member, old.extractfile(member))
        if add is not None:
            info = tarfile.TarInfo(add[0])
            info.size = len(add[1])
            new.addfile(info, io.BytesIO(add[1]))
        if symlink is not None:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
            new.addfile(info)
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drop": "debs/demo-b_1.0_all.deb"}, "debs/demo-b_1.0_all.deb listed in manifest.json but missing"),
        ({"add": ("debs/evil.deb", b"x")}, "debs/evil.deb is not listed in manifest.json"),
        ({"manifest_last": True}, "manifest.json is not its first member"),
        ({"symlink": "debs/link"}, "only regular files and directories"),
    ],
)
def test_tampered_bundles_are_refused(built, tmp_path, change, message):
    output, _ = built
    with pytest.raises(BundleError, match=message):
        bundle.verify_bundle(_rewrite(output, tmp_path / "tampered.tar", **change))


def test_a_file_that_is_not_a_bundle_is_refused(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(BundleError, match="cannot read the bundle"):
        bundle.verify_bundle(junk)
    with pytest.raises(BundleError, match="no such bundle file"):
        bundle.verify_bundle(tmp_path / "absent.tar")


def test_a_missing_image_file_stops_the_build_early(tmp_path, project):
    image = stand_in_image(tmp_path / "images", "guest-x")
    (image / "initrd.img").unlink()
    with pytest.raises(BundleError, match=r"lacks initrd\.img"):
        _create(tmp_path / "b.tar", image, tmp_path, project,
                fetch_debs=lambda *a: pytest.fail("fetched debs for a broken image"))


def test_gzip_bundles_verify_too(tmp_path, project):
    image = stand_in_image(tmp_path / "images", "guest-y")
    output = tmp_path / "b.tar.gz"
    _create(output, image, tmp_path, project,
            fetch_debs=lambda packages, *a: [_tiny_deb(tmp_path, name) for name in packages],
            fetch_wheels=lambda p, c, dest: [])
    assert output.read_bytes()[:2] == b"\x1f\x8b"
    assert bundle.verify_bundle(output)["image_id"] == "guest-y"


def test_summary_counts_what_is_inside(built):
    _, manifest = built
    lines = list(bundle.summary(manifest))
    assert "guest image guest-0123456789abcdef" in lines[1]
    assert lines[2].startswith("2 Debian packages") and "demo-a, demo-b" in lines[2]


# --- QEMU >= 10 ---------------------------------------------------------------------------------------------------


def test_the_manifest_records_each_packages_exact_version_from_its_control_fields(built):
    _, manifest = built
    assert manifest["package_versions"] == {"demo-a": "1.0", "demo-b": "1.0"}


def test_a_qemu_older_than_the_supported_release_is_not_bundled(tmp_path, project):
    (project / "roles" / "demo" / "defaults" / "main.yml").write_text("demo_packages: [qemu-system-x86]\n")
    image = stand_in_image(tmp_path / "images", "guest-q")

    def fetch_debs(version: str):
        return lambda packages, mirror, suite, cache_dir: [_tiny_deb(tmp_path / version, "qemu-system-x86", version)]

    wheels = {"fetch_wheels": lambda p, c, dest: []}
    with pytest.raises(BundleError, match=r"qemu-system-x86 1:7.2\+dfsg-7 is older than the supported 1:10.0"):
        _create(tmp_path / "old.tar", image, tmp_path / "c", project, fetch_debs=fetch_debs("1:7.2+dfsg-7"), **wheels)
    manifest = _create(tmp_path / "new.tar", image, tmp_path / "c", project,
                       fetch_debs=fetch_debs("1:10.0.2+ds-2+deb13u1~bpo12+1"), **wheels)
    assert manifest["package_versions"] == {"qemu-system-x86": "1:10.0.2+ds-2+deb13u1~bpo12+1"}
    assert "QEMU 1:10.0.2+ds-2+deb13u1~bpo12+1" in list(bundle.summary(manifest))


def test_debian_12_bundles_resolve_qemu_from_backports_pinned_to_qemu_only():
    from appliance import host_tools
    from appliance.build.apt import Apt

    sources, preferences = Apt.with_qemu_backports("http://mirror/debian/", "bookworm")
    assert sources[-1] == "deb http://mirror/debian bookworm-backports main"
    assert preferences == host_tools.apt_preferences("bookworm-backports")  # the same pins as `make setup`
    assert Apt.with_qemu_backports("http://mirror/debian", "trixie") == (Apt.sources("http://mirror/debian", "trixie"),
                                                                         "")


@pytest.mark.parametrize("versions", [[], {"qemu-system-x86": "1.0; rm -rf /"}, {"qemu-system-x86": 10}])
def test_a_manifest_with_malformed_package_versions_is_refused(versions):
    data = json.dumps({"format": bundle.FORMAT, "files": {}, "package_versions": versions}).encode()
    with pytest.raises(BundleError, match="package_versions"):
        bundle.parse_manifest(data)
