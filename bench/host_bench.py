"""Host image benchmark: image size, build time cold and warm, power-on -> API ready per firmware (QEMU, TCG here).

    .venv/bin/python bench/host_bench.py [--cold] [--exec] [--format raw]

  - build, warm: the root stage cached (a rebuild after a site config change): only the disk stage runs;
  - build, root: the base cached, the roles applied again (a rebuild after a roles or appliance change, --force);
  - build, cold (--cold): the base stage removed from the cache too, so mmdebstrap runs again (downloads come from
    the apt and pip caches: the network is not measured);
  - image: bytes the raw file takes on disk (sparse), its virtual size, and a qcow2 of it;
  - per firmware (UEFI/OVMF, BIOS/SeaBIOS): power-on -> SSH answers, -> GET /v1/healthz answers, and with --exec
    the first create + exec through the API after that (nested virtualization inside the node).
Baseline in the same run: the guest image build when cached, and a cold boot of a sandbox microVM on this machine.
This machine is shared and noisy; the orders of magnitude matter, not the last digit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.build.guest import build_guest_image
from appliance.build.host.image import build_host_image
from appliance.progress import Progress
from appliance.spec import load_spec
from tests.hostimage import nodevm

MIB = 1 << 20


class Results(list):
    """(label, value) rows, each also printed as it is measured (a run that fails later still shows them)."""

    def append(self, row: tuple[str, str]) -> None:
        super().append(row)
        print(f"  {row[0]}: {row[1]}", file=sys.stderr, flush=True)


def timed(label: str, results: list[tuple[str, str]], function):
    started = time.monotonic()
    value = function()
    results.append((label, f"{time.monotonic() - started:.1f} s"))
    return value


def boot(image: Path, firmware: str, key: Path, workdir: Path, exec_too: bool) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    disk = nodevm.prepare_disk(image, workdir / "disk.raw", nodevm.site_toml(key.with_suffix(".pub").read_text()))
    vm = nodevm.NodeVM(disk, firmware, workdir, nested_virt=True).start()
    try:
        times = {"ssh": vm.wait_ssh(key, 900), "api": vm.wait_http("/v1/healthz", 900)}
        if exec_too:
            from appliance.client import Sandbox

            api_key = vm.ssh(key, "cat /etc/appliance/api-key").stdout.strip()
            times["probes"] = nodevm.ensure_nested_kvm(vm, key)
            started = time.monotonic()
            with Sandbox(url=f"http://127.0.0.1:{vm.api_port}", api_key=api_key, request_timeout=1500,
                         ready_timeout=1500) as sandbox:
                assert sandbox.run_code("6 * 7").text == "42"
            times["exec"] = time.monotonic() - started
        return times
    finally:
        vm.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also rebuild the mmdebstrap base (about a minute)")
    parser.add_argument("--exec", action="store_true", help="also time the first create + exec in each node")
    args = parser.parse_args()
    spec = load_spec()
    results: list[tuple[str, str]] = Results()
    quiet = Progress(quiet=True)
    with tempfile.TemporaryDirectory(prefix="host-bench-") as scratch_name:
        scratch = Path(scratch_name)
        image = scratch / "node.img"
        timed("baseline: guest image build, cached", results, lambda: build_guest_image(spec, progress=quiet))
        if args.cold:
            from appliance.build.apt import Apt
            from appliance.build.common import read_list
            from appliance.build.host.image import HOST_RECIPE
            from appliance.build.rootfs import base_stage

            packages = read_list(HOST_RECIPE / "packages.txt")
            options = read_list(HOST_RECIPE / "dpkg-options.txt")
            sources = Apt.sources(spec.guest.mirror, spec.guest.suite)
            timed("build host, cold (base + root + disk)", results, lambda: (
                base_stage(spec.guest.suite, sources, packages, options, spec.paths.cache_dir, refresh=True),
                build_host_image(spec, image, force=True, progress=quiet)))
        timed("build host, root stage (roles applied again, --force)", results,
              lambda: build_host_image(spec, image, force=True, progress=quiet))
        built = timed("build host, warm (root stage cached)", results,
                      lambda: build_host_image(spec, image, progress=quiet))
        assert built.cached_root
        allocated = image.stat().st_blocks * 512
        results.append(("image: raw, on disk (sparse) / virtual", f"{allocated / MIB:.0f} MiB / "
                                                                  f"{image.stat().st_size / MIB:.0f} MiB"))
        qcow2 = scratch / "node.qcow2"
        timed("build host, warm, --format qcow2", results,
              lambda: build_host_image(spec, qcow2, fmt="qcow2", progress=quiet))
        results.append(("image: qcow2", f"{qcow2.stat().st_size / MIB:.0f} MiB"))
        qcow2.unlink()

        key = scratch / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        for firmware, label in (("uefi", "UEFI (OVMF)"), ("bios", "BIOS (SeaBIOS)")):
            times = boot(image, firmware, key, scratch / firmware, args.exec)
            results.append((f"{label}: power-on -> SSH", f"{times['ssh']:.0f} s"))
            results.append((f"{label}: power-on -> API /v1/healthz", f"{times['api']:.0f} s"))
            if "exec" in times:
                results.append((f"{label}: first create + exec after that (nested KVM, "
                                f"{times['probes']:.0f} probe(s))", f"{times['exec']:.0f} s"))
            shutil.rmtree(scratch / firmware, ignore_errors=True)

        from service import settings
        from service.engine import Engine

        engine = Engine(settings.engine_config(spec))
        started = time.monotonic()
        sandbox = engine.boot(die_with_parent=True)
        try:
            results.append((f"baseline: sandbox microVM cold boot here ({engine.accelerator.name})",
                            f"{time.monotonic() - started:.1f} s"))
        finally:
            sandbox.close()
    width = max(len(label) for label, _ in results)
    for label, value in results:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
