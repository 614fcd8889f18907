"""The execution API for real: `appliance serve` (gunicorn, 2 workers, the pool keeper) and real microVMs.

One service per module (template warm-up is slow under TCG); the last test stops and restarts it.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from appliance.client import NotFoundError, Sandbox, SandboxBusyError
from appliance.client.tools import run_tool_call
from service.engine.netpolicy import system_resolver
from tests.live_service import LiveService, rss_kib
from tests.vmtools import qemu_pids_under

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HANG_DEADLINE_S = 60  # waits that only a hang reaches, however slow this host is
MAX_REQUESTS = 150  # small, so the recycling test sees both workers replaced


@pytest.fixture(scope="module")
def live():
    service = LiveService(
        workers=2, pool_size=1, max_requests=MAX_REQUESTS,
        env_extra={
            "APPLIANCE_SERVICE__MAX_BODY_BYTES": str(64 << 10),
            "APPLIANCE_SERVICE__MAX_CODE_BYTES": str(32 << 10),
            "APPLIANCE_SERVICE__MAX_SANDBOXES_PER_KEY": "4",
            # test_network_policy_through_the_api_and_sdk names a benchmarking range and this host's own name
            "APPLIANCE_SERVICE__EGRESS_PRIVATE_ALLOW": json.dumps(
                ["198.18.9.0/24", *(f"{a}/32" for a in system_resolver(socket.gethostname()))]),
            "APPLIANCE_GUNICORN_GRACEFUL_TIMEOUT": "60",
        },
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def api(live):
    with live.client() as client:
        yield client


@pytest.fixture(scope="module")
def shared_sandbox(api):
    """One sandbox most tests use (creates are cheap, but each is a VM on a 2-core host)."""
    sandbox = api.post("/v1/sandboxes", json={"metadata": {"test": "shared"}})
    assert sandbox.status_code == 201, sandbox.text
    return sandbox.json()["id"]


def execute(client: httpx.Client, sandbox_id: str, code: str, **fields) -> dict:
    response = client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


# ---- startup, probes, description ---------------------------------------------------------------------------------


def test_not_ready_while_warming_is_503_with_retry_after(live):
    for name in ("readyz", "create"):
        response = live.startup[name]
        assert_error(response, 503, "not_ready")
        assert int(response.headers["Retry-After"]) > 0


def test_probes_and_docs_need_no_key(live):
    assert httpx.get(f"{live.url}/v1/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{live.url}/v1/readyz").json() == {"status": "ready"}
    doc = httpx.get(f"{live.url}/v1/openapi.json").json()
    assert doc["openapi"] == "3.1.0" and "/v1/sandboxes/{sandbox_id}/exec" in doc["paths"]
    page = httpx.get(f"{live.url}/v1/docs")
    assert page.headers["content-type"].startswith("text/html") and "/v1/sandboxes" in page.text
    assert_error(httpx.get(f"{live.url}/metrics"), 401, "unauthorized")


# ---- any worker serves any sandbox ----------------------------------------------------------------------------------


def test_create_on_one_worker_exec_on_others_keeps_state(live):
    headers = live.headers()
    created = httpx.post(f"{live.url}/v1/sandboxes", headers=headers, timeout=60)  # a connection of its own
    assert created.status_code == 201
    sandbox_id = created.json()["id"]
    workers = {int(created.headers["X-Appliance-Worker"])}
    count = 0
    while count < 40 and (len(workers) < 2 or count < 6):
        count += 1
        response = httpx.post(  # a new connection each time: the kernel hands it to whichever worker accepts
            f"{live.url}/v1/sandboxes/{sandbox_id}/exec", headers=headers, timeout=60,
            json={"code": "n = globals().get('n', 0) + 1\nn"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["text"] == str(count)  # one namespace, whichever worker carried the call
        workers.add(int(response.headers["X-Appliance-Worker"]))
    assert len(workers) >= 2, f"every request landed on one worker: {workers}"
    assert httpx.delete(f"{live.url}/v1/sandboxes/{sandbox_id}", headers=headers).status_code == 204


def test_streaming_yields_chunks_before_the_code_finishes(api, shared_sandbox):
    # The code runs until interrupted, and the test interrupts it when the first line arrives: a stream that held
    # its lines until the code had finished would end in the exec's timeout (a TimeoutError) instead.
    code = "import time\nprint('tick', 0, flush=True)\ntime.sleep(3600)"
    events: list[dict] = []
    with api.stream("POST", f"/v1/sandboxes/{shared_sandbox}/exec", json={"code": code, "timeout_s": HANG_DEADLINE_S},
                    headers={"Accept": "application/x-ndjson"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            events.append(json.loads(line))
            if len(events) == 1:
                assert events[0] == {"type": "stdout", "data": "tick 0\n"}
                assert api.post(f"/v1/sandboxes/{shared_sandbox}/interrupt").status_code == 202
    assert [event["type"] for event in events] == ["stdout", "done"]
    done = events[-1]
    assert done["stdout"] == "tick 0\n"
    # A TimeoutError: the line was held back until the end, or the 202-accepted interrupt never reached the code.
    assert done["error"]["name"] == "KeyboardInterrupt", done["error"]


# ---- rich output ---------------------------------------------------------------------------------------------------


def test_matplotlib_png_decodes(api, shared_sandbox):
    result = execute(api, shared_sandbox, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert result["error"] is None, result["error"]
    pngs = [bundle["image/png"] for bundle in result["results"] if "image/png" in bundle]
    assert len(pngs) == 1
    data = base64.b64decode(pngs[0])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_dataframe_has_html(api, shared_sandbox):
    result = execute(api, shared_sandbox, "import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z']})")
    value = result["results"][-1]
    assert "<table" in value["text/html"] and "text/plain" in value
    assert result["text"] == value["text/plain"]


# ---- timeouts ------------------------------------------------------------------------------------------------------


def test_timeout_interrupt_keeps_state(api, shared_sandbox):
    execute(api, shared_sandbox, "kept = 'still here'")
    result = execute(api, shared_sandbox, "import time\nwhile True: time.sleep(0.05)", timeout_s=1.0)
    assert result["error"]["name"] == "TimeoutError" and result["worker_restarted"] is False
    assert execute(api, shared_sandbox, "kept")["text"] == "'still here'"


def test_code_that_ignores_the_interrupt_restarts_the_worker_and_the_sandbox_stays_usable(api, live):
    sandbox_id = api.post("/v1/sandboxes").json()["id"]
    try:
        code = (
            "import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
            "    except KeyboardInterrupt:\n        pass"
        )
        result = execute(api, sandbox_id, code, timeout_s=1.0)
        assert result["worker_restarted"] is True and result["error"] is not None
        assert execute(api, sandbox_id, "6 * 7")["text"] == "42"
    finally:
        api.delete(f"/v1/sandboxes/{sandbox_id}")


# ---- keys and errors -----------------------------------------------------------------------------------------------


def test_key_isolation(live, api, shared_sandbox):
    with live.client(live.other_key) as other:
        assert shared_sandbox not in [s["id"] for s in other.get("/v1/sandboxes").json()["sandboxes"]]
        path = f"/v1/sandboxes/{shared_sandbox}"
        assert_error(other.get(path), 404, "not_found")
        assert_error(other.post(f"{path}/exec", json={"code": "kept"}), 404, "not_found")
        assert_error(other.post(f"{path}/interrupt"), 404, "not_found")
        assert_error(other.get(f"{path}/files", params={"path": "/etc/hostname"}), 404, "not_found")
        assert_error(other.delete(path), 404, "not_found")
    assert api.get(f"/v1/sandboxes/{shared_sandbox}").status_code == 200


def test_every_error_code_from_a_real_bad_request(live, api, shared_sandbox):
    exec_path = f"/v1/sandboxes/{shared_sandbox}/exec"
    # 400: not JSON
    assert_error(api.post(exec_path, content=b"{oops", headers={"Content-Type": "application/json"}), 400,
                 "bad_request")
    # 401: no key, wrong key
    assert_error(httpx.get(f"{live.url}/v1/sandboxes"), 401, "unauthorized")
    assert_error(httpx.get(f"{live.url}/v1/sandboxes", headers=live.headers("not-a-key")), 401, "unauthorized")
    # 404: no such sandbox, no such route; 405: wrong method
    assert_error(api.get("/v1/sandboxes/sb-0000000000000000"), 404, "not_found")
    assert_error(api.get("/v1/nope"), 404, "not_found")
    assert_error(api.patch(f"/v1/sandboxes/{shared_sandbox}"), 405, "method_not_allowed")
    # 413: body over service.max_body_bytes; code over service.max_code_bytes
    assert_error(api.post(exec_path, json={"code": "#" * (70 << 10)}), 413, "too_large")
    assert_error(api.post(exec_path, json={"code": "#" * (40 << 10)}), 413, "too_large")
    # 422: an invalid field, named
    error = assert_error(api.post("/v1/sandboxes", json={"vcpus": 0}), 422, "invalid")
    assert error["field"] == "vcpus"
    assert assert_error(api.post(exec_path, json={"code": "1", "language": "cobol"}), 422, "invalid")["field"] \
        == "language"
    # 409: one exec at a time
    with api.stream("POST", exec_path, json={"code": "print('go', flush=True)\nimport time\ntime.sleep(3600)"},
                    headers={"Accept": "application/x-ndjson"}) as running:
        lines = running.iter_lines()
        assert json.loads(next(lines))["type"] == "stdout"  # running now, and until the test interrupts it
        try:
            assert "already running" in assert_error(api.post(exec_path, json={"code": "1"}), 409, "sandbox_busy")[
                "message"]
        finally:
            api.post(f"/v1/sandboxes/{shared_sandbox}/interrupt")
        assert json.loads(list(lines)[-1])["type"] == "done"
    # 429: too many sandboxes for this key (limit 4), with Retry-After
    with live.client(live.other_key) as other:
        made = []
        try:
            for _ in range(4):
                response = other.post("/v1/sandboxes")
                assert response.status_code == 201, response.text
                made.append(response.json()["id"])
            limited = other.post("/v1/sandboxes")
            assert_error(limited, 429, "limit_reached")
            assert int(limited.headers["Retry-After"]) > 0
            # 410: the VM of a sandbox died under it
            victim = made[0]
            pid = int((live.run_dir / "sandboxes" / f"vm-{victim}" / "qemu.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + HANG_DEADLINE_S
            while pid in qemu_pids_under(live.run_dir):
                assert time.monotonic() < deadline, f"QEMU {pid} outlived SIGKILL"
                time.sleep(0.02)
            assert_error(other.post(f"/v1/sandboxes/{victim}/exec", json={"code": "1"}), 410, "sandbox_lost")
        finally:
            for sandbox_id in made:
                other.delete(f"/v1/sandboxes/{sandbox_id}")


def test_metrics_merge_every_worker(live, api, shared_sandbox):
    for _ in range(4):
        execute(api, shared_sandbox, "1")
    assert_error(api.get("/metrics"), 403, "forbidden")  # a tenant key does not see every tenant's activity
    text = api.get("/metrics", headers=live.headers(live.metrics_key)).text
    assert 'appliance_sandboxes{state="running"}' in text
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('appliance_exec_seconds_count{language="python",mode="json"}'))
    assert count >= 4
    assert "appliance_creates_total" in text and 'appliance_errors_total{code="not_ready"}' in text


# ---- SDK, tool calls, the example -------------------------------------------------------------------------------


def test_sdk_against_the_live_service(live):
    with Sandbox(url=live.url, api_key=live.key) as sb:
        sb.run_code("import pandas as pd; df = pd.DataFrame({'a': [1, 2, 3]})")
        assert sb.run_code("df.a.sum()").text in {"6", "np.int64(6)"}  # numpy 2 reprs its scalars
        stream = sb.run_code("for i in range(3): print(i)", stream=True)
        assert "".join(e["data"] for e in stream if e["type"] == "stdout") == "0\n1\n2\n"
        assert stream.execution.stdout == "0\n1\n2\n"
        info = sb.files.write("/tmp/sdk/in.csv", b"a,b\n1,2\n")
        assert info["size"] == 8
        assert sb.files.read("/tmp/sdk/in.csv") == b"a,b\n1,2\n"
        assert "in.csv" in [entry["name"] for entry in sb.files.list("/tmp/sdk")]
        assert sb.run_code("open('/tmp/sdk/in.csv').read()").text == "'a,b\\n1,2\\n'"
        listing = sb.commands.run("ls -la /tmp/sdk && echo done")
        assert listing.exit_code == 0 and "in.csv" in listing.stdout
        again = Sandbox.connect(sb.id, url=live.url, api_key=live.key)
        assert again.run_code("int(df.a.sum())").text == "6"
        again.detach()
        with pytest.raises(SandboxBusyError):
            running = sb.run_code("import time; print('x', flush=True); time.sleep(3600)", stream=True)
            next(iter(running))  # running now, and until interrupted below
            again = Sandbox.connect(sb.id, url=live.url, api_key=live.key)
            try:
                again.run_code("1")
            finally:
                sb.interrupt()
                list(running)
                again.detach()
    with pytest.raises(NotFoundError):
        Sandbox.connect(sb.id, url=live.url, api_key=live.key)


def test_tool_call_helper_against_the_live_service(live):
    code = "import numpy as np\nprint(int(np.arange(10).sum()))"
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "run_python", "arguments": json.dumps({"code": code})}},
        {"type": "tool_use", "id": "t1", "name": "run_python", "input": {"code": code}},
        {"functionCall": {"name": "run_python", "args": {"code": code}}},
    ]
    with Sandbox(url=live.url, api_key=live.key) as sb:
        for call in calls:
            assert run_tool_call(call, sb) == "[stdout]\n45"
        assert "ZeroDivisionError" in run_tool_call({"name": "run_python", "args": {"code": "1/0"}}, sb)


def test_network_policy_through_the_api_and_sdk(live):
    """The whole path of a policy: JSON body -> manager -> host namespace -> guest interface, and back out in the
    sandbox's description. (What passes the filter is tested against real servers in test_network.py.)"""
    interfaces = "import os; sorted(os.listdir('/sys/class/net'))"
    with Sandbox(url=live.url, api_key=live.key) as plain:
        assert plain.network is None and plain.run_code(interfaces).text == "['lo']"
    host_name = socket.gethostname()  # a name the host resolves and the guest knows nothing about
    allow = ["198.18.9.0/24", f"{host_name}:5432"]
    with Sandbox(url=live.url, api_key=live.key, network=allow) as sb:
        assert sb.network["egress"] == {"allow": allow}
        assert sb.run_code(interfaces).text == "['eth0', 'lo']"
        # The name was resolved on the host, at creation, and handed to the guest.
        resolved = sb.run_code(f"import socket; socket.gethostbyname({host_name!r})").text
        assert resolved == repr(system_resolver(host_name)[0])
        mac = sb.run_code("open('/sys/class/net/eth0/address').read().strip()").text.strip("'")
        assert mac == sb.network["mac"]


def test_example_tool_loop_against_a_fake_model(live):
    scripted_model = _load_example("scripted_model")
    server = scripted_model.start()
    try:
        env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1",
               "OPENAI_API_KEY": "fake", "MODEL": "scripted", "APPLIANCE_URL": live.url,
               "APPLIANCE_API_KEY": live.key}
        done = subprocess.run([sys.executable, str(REPO / "examples" / "chat_with_code.py"), "sum of a?"],
                              env=env, capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "The tool said: '[result]\\n6'"
    first, second = scripted_model.ScriptedModel.requests
    assert first["tools"][0]["function"]["name"] == "run_python"
    assert second["messages"][-1]["tool_call_id"] == "call_1"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- files ---------------------------------------------------------------------------------------------------------


def _gigabyte(block: bytes, count: int):
    for index in range(count):
        yield index.to_bytes(8, "little") + block[8:]


def test_one_gigabyte_round_trip_with_bounded_service_memory(live, api):
    chunk, count = 1 << 20, 1024
    block = os.urandom(chunk)
    expected = hashlib.sha256()
    for piece in _gigabyte(block, count):
        expected.update(piece)
    sandbox_id = api.post("/v1/sandboxes", json={"memory_mib": 3072}, timeout=180).json()["id"]
    peak = {"kib": 0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            for pid in live.worker_pids():
                peak["kib"] = max(peak["kib"], rss_kib(pid))
            time.sleep(0.05)

    baseline = max(rss_kib(pid) for pid in live.worker_pids())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        timeout = httpx.Timeout(60, read=900, write=900)
        written = api.put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/big.bin"},
                          content=_gigabyte(block, count), timeout=timeout)
        assert written.status_code == 200, written.text
        assert written.json()["size"] == chunk * count
        assert written.json()["sha256"] == expected.hexdigest()
        received = hashlib.sha256()
        size = 0
        with api.stream("GET", f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/big.bin"},
                        timeout=timeout) as response:
            assert response.status_code == 200
            assert int(response.headers["Content-Length"]) == chunk * count
            for piece in response.iter_bytes(chunk):
                received.update(piece)
                size += len(piece)
        assert size == chunk * count and received.hexdigest() == expected.hexdigest()
    finally:
        sampling.set()
        sampler.join()
        api.delete(f"/v1/sandboxes/{sandbox_id}")
    growth_mib = (peak["kib"] - baseline) / 1024
    assert growth_mib < 128, f"a worker grew by {growth_mib:.0f} MiB moving 1 GiB (baseline {baseline // 1024} MiB)"


# ---- process lifecycle (keep these last: they recycle and restart the service) ---------------------------------------


def test_worker_recycling_keeps_sandboxes(live, api, shared_sandbox):
    execute(api, shared_sandbox, "survivor = 'ok'")
    qemu_before = set(qemu_pids_under(live.run_dir))
    original = set(live.worker_pids())
    for _ in range(MAX_REQUESTS * 2 * 3):
        if not original & set(live.worker_pids()):
            break
        httpx.get(f"{live.url}/v1/healthz")  # a fresh connection each time, to reach both workers
    assert not original & set(live.worker_pids()), "the workers were not recycled"
    assert execute(api, shared_sandbox, "survivor")["text"] == "'ok'"
    assert qemu_before <= set(qemu_pids_under(live.run_dir))


def test_stopping_the_service_keeps_user_sandboxes_for_the_next_start(live, api, shared_sandbox):
    execute(api, shared_sandbox, "across_restarts = 42")
    vm_pid = int((live.run_dir / "sandboxes" / f"vm-{shared_sandbox}" / "qemu.pid").read_text())
    keeper, workers = live.keeper_pids(), live.worker_pids()
    assert keeper and workers
    live.process.send_signal(signal.SIGTERM)
    live.process.wait(timeout=60)
    assert all(not Path(f"/proc/{pid}").exists() for pid in keeper + workers)
    assert Path(f"/proc/{vm_pid}").exists(), "the user's sandbox VM died with the service"
    assert live.pooled() == 0  # the keeper stopped its pooled clones on the way out
    live.start()
    with live.client() as client:
        assert execute(client, shared_sandbox, "across_restarts")["text"] == "42"
