"""What the host itself enforces on a sandbox, shown by behaviour through a real `appliance serve` (root, jailed VMs):

- the per-VM memory cgroup (docs/security.md, "host cgroup limits"): a guest whose memory plus QEMU's own needs is
  more than its host cgroup allows is ended by the host's OOM killer when its code touches that memory, and the API
  says so (410 sandbox_lost naming the host's memory limit; the sandbox shows as lost). The guest's own OOM killer
  must not get there first: the guest is sized so that its RAM alone fits, and QEMU (the TCG code cache, its own
  heap) is what tips it over, which `isolation.memory_overhead_mib` at its minimum (64) does not cover.
- a host that cannot build sandbox networks (no `nft` on the service's PATH) answers a create with a network
  policy with 422 network_unavailable naming the missing program, not 500.

One service for both (the second needs no VM of its own). cgroup v1 memory limits are enforced on the development
machine (a child cgroup of the service's own); on cgroup v2 they are where the service's cgroup is delegated.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_service import LiveService

pytestmark = pytest.mark.integration
GUEST_MIB = 512
OVERHEAD_MIB = 64  # the spec's minimum: less than QEMU itself uses under TCG (a 64 MiB code cache alone)

# Touch every page of as much memory as the guest will give, 16 MiB at a time: the guest's RAM fills, and with it
# what its QEMU holds on the host. Whoever stops this first (the host's OOM killer, or the guest's) decides the test.
TOUCH_ALL = """
chunks = []
try:
    while True:
        chunk = bytearray(16 << 20)
        for i in range(0, len(chunk), 4096):
            chunk[i] = 1
        chunks.append(chunk)
except MemoryError:
    pass
len(chunks)
"""


@pytest.fixture(scope="module")
def service() -> Iterator[LiveService]:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        pytest.skip("host limits need the VMM jail: root and bubblewrap")
    # The service's PATH without nft (and without the directories holding it): everything else it runs stays.
    # (On merged-/usr hosts /sbin is /usr/sbin: compare real paths.)
    nft = shutil.which("nft")
    nft_dir = Path(nft).resolve().parent if nft else None
    no_nft = Path(tempfile.mkdtemp(prefix="appliance-no-nft-"))
    path = [p for p in os.environ.get("PATH", "").split(":") if p and Path(p).resolve() != nft_dir]
    for tool in nft_dir.iterdir() if nft_dir else ():
        if tool.name != "nft":
            (no_nft / tool.name).symlink_to(tool)
    live = LiveService(workers=1, pool_size=1, env_extra={
        "APPLIANCE_GUEST__MEMORY_MIB": str(GUEST_MIB),
        "APPLIANCE_ISOLATION__JAIL": "on",
        "APPLIANCE_ISOLATION__MEMORY_OVERHEAD_MIB": str(OVERHEAD_MIB),
        "APPLIANCE_SERVICE__WARM_CODE": "import json",
        "PATH": ":".join([*path, str(no_nft)]),
    })
    try:
        yield live.start()
    finally:
        live.stop()
        shutil.rmtree(no_nft, ignore_errors=True)


def test_a_guest_bigger_than_its_host_cgroup_is_ended_by_the_host_and_the_api_says_so(service):
    with service.client() as api:
        created = api.post("/v1/sandboxes")
        assert created.status_code == 201, created.text
        sandbox = created.json()["id"]
        try:
            answer = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"code": TOUCH_ALL, "timeout_s": 600})
            assert answer.status_code == 410, answer.text  # 200 with worker_exit: the guest's OOM killer won
            error = answer.json()["error"]
            assert error["code"] == "sandbox_lost"
            limit = GUEST_MIB + OVERHEAD_MIB
            assert f"the host's OOM killer ended QEMU: the VM reached its host memory limit ({limit} MiB" in \
                error["message"], error["message"]
            shown = api.get(f"/v1/sandboxes/{sandbox}")
            assert shown.status_code == 200 and shown.json()["state"] == "lost", shown.text
            again = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"code": "1"})
            assert again.status_code == 410 and again.json()["error"]["code"] == "sandbox_lost"
        finally:
            api.delete(f"/v1/sandboxes/{sandbox}")
        # the host ended that one QEMU only: the service goes on handing out sandboxes that answer
        neighbour = api.post("/v1/sandboxes").json()["id"]
        try:
            assert api.post(f"/v1/sandboxes/{neighbour}/exec", json={"code": "1 + 1"}).json()["text"] == "2"
        finally:
            api.delete(f"/v1/sandboxes/{neighbour}")


def test_a_host_without_nft_answers_422_network_unavailable(service):
    with service.client() as api:
        answer = api.post("/v1/sandboxes", json={"network": {"egress": "none"}})
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "network_unavailable" and "nft" in error["message"], error
        assert api.get("/v1/sandboxes").json()["sandboxes"] == []  # nothing half-made is left to the key
