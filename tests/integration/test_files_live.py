"""The files API for real: one `appliance serve` and one sandbox for the module, driven through the SDK and plain
HTTP. Every file operation, watch events, links planted by user code, and bad paths with their status codes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from appliance.client import FileConflictError, InvalidRequestError, NotFoundError, Sandbox
from tests.live_service import LiveService

pytestmark = pytest.mark.integration

HANG_DEADLINE_S = 60  # waits that only a hang reaches


@pytest.fixture(scope="module")
def live() -> Iterator[LiveService]:
    # No pandas in the template: these tests need none, and its import is most of a template's warm-up.
    service = LiveService(workers=1, pool_size=0, env_extra={"APPLIANCE_SERVICE__WARM_CODE": "import json"})
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def sb(live) -> Iterator[Sandbox]:
    with Sandbox(url=live.url, api_key=live.key) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def api(live) -> Iterator[httpx.Client]:
    with live.client() as client:
        yield client


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


def test_every_file_operation(sb):
    assert sb.files.make_dir("/data/ops/a/b") is True  # mkdir -p
    assert sb.files.make_dir("/data/ops/a/b") is False
    sb.files.write("/data/ops/a/b/one.txt", b"one")
    sb.files.write("/data/ops/a/two.txt", "two")
    sb.files.write("/data/ops/top.txt", b"")
    info = sb.files.stat("/data/ops/a/two.txt")
    assert (info["type"], info["size"], info["name"]) == ("file", 3, "two.txt")
    assert sb.files.stat("/data/ops/a")["type"] == "dir"
    assert sb.files.exists("/data/ops/top.txt") and not sb.files.exists("/data/ops/none")
    # user code sees what the API made, owned by the sandbox user
    assert sb.run_code("import os; os.stat('/data/ops/a/b/one.txt').st_uid").text == "1000"

    # recursive listing, page by page, equals one walk; depth 1 lists the directory alone
    walk = ["a", "a/b", "a/b/one.txt", "a/two.txt", "top.txt"]
    assert [e["name"] for e in sb.files.list("/data/ops", depth=8)] == walk
    assert [e["name"] for e in sb.files.iter("/data/ops", page_size=2, depth=8)] == walk
    assert [e["name"] for e in sb.files.list("/data/ops", depth=2)] == ["a", "a/b", "a/two.txt", "top.txt"]
    assert [e["name"] for e in sb.files.list("/data/ops")] == ["a", "top.txt"]
    assert sb.files.list("/data/ops", depth=8)[2]["path"] == "/data/ops/a/b/one.txt"

    # rename: a file into another directory, a directory, and onto an existing name only with overwrite
    sb.files.rename("/data/ops/a/two.txt", "/data/ops/a/b/two.txt")
    assert sb.files.read("/data/ops/a/b/two.txt") == b"two"
    with pytest.raises(FileConflictError, match=r"/data/ops/a/b/one\.txt") as refused:
        sb.files.rename("/data/ops/a/b/two.txt", "/data/ops/a/b/one.txt")
    assert refused.value.status == 409 and refused.value.code == "already_exists"
    sb.files.rename("/data/ops/a/b/two.txt", "/data/ops/a/b/one.txt", overwrite=True)
    assert sb.files.read("/data/ops/a/b/one.txt") == b"two"
    sb.files.rename("/data/ops/a", "/data/ops/moved")
    sb.files.rename("/data/ops/moved/b/one.txt", "/tmp/one.txt")  # out of /data (another filesystem or not)
    assert sb.files.read("/tmp/one.txt") == b"two" and not sb.files.exists("/data/ops/moved/b/one.txt")

    # remove: a file; a non-empty directory only when recursive
    sb.files.remove("/tmp/one.txt")
    assert not sb.files.exists("/tmp/one.txt")
    sb.files.write("/data/ops/moved/b/deep.txt", b"x")
    with pytest.raises(FileConflictError, match="/data/ops/moved") as refused:
        sb.files.remove("/data/ops/moved")
    assert refused.value.code == "not_empty"
    sb.files.remove("/data/ops/moved", recursive=True)
    assert [e["name"] for e in sb.files.list("/data/ops", depth=8)] == ["top.txt"]
    sb.files.remove("/data/ops", recursive=True)
    assert not sb.files.exists("/data/ops")


def test_an_upload_is_never_seen_half_written(sb, live):
    """While an upload is under way its file keeps its old content; the new one appears whole, at once."""
    sb.files.write("/data/atomic.bin", b"old")
    seen: dict[str, object] = {}
    chunk = b"n" * (1 << 20)

    def body() -> Iterator[bytes]:
        yield chunk
        yield chunk
        other = Sandbox.connect(sb.id, url=live.url, api_key=live.key)  # another connection, as another client
        try:
            deadline = time.monotonic() + HANG_DEADLINE_S
            while time.monotonic() < deadline:  # until the guest holds part of the upload
                temps = [e for e in other.files.list("/data") if e["name"].startswith(".atomic.bin.upload-")]
                if temps and temps[0]["size"] > 0:
                    break
                time.sleep(0.05)
            seen["temps"] = temps
            seen["during"] = other.files.read("/data/atomic.bin")
            seen["code_sees"] = other.run_code("open('/data/atomic.bin', 'rb').read()").text
        finally:
            other.detach()
        yield chunk

    info = sb.files.write("/data/atomic.bin", body())
    assert seen["temps"], "the upload never reached the guest"
    assert seen["during"] == b"old" and seen["code_sees"] == "b'old'"
    assert info["size"] == 3 << 20 and sb.files.read("/data/atomic.bin") == chunk * 3
    assert not [e for e in sb.files.list("/data") if ".upload-" in e["name"]]  # nothing left behind


def _collect(watch, wanted: set[tuple[str, str]], seen: list[dict]) -> None:
    for event in watch:
        seen.append(event)
        if wanted <= {(e["type"], e["path"]) for e in seen}:
            return


def test_watch_sees_a_burst_of_writes_and_a_recursive_delete(sb):
    sb.files.make_dir("/data/watched/sub")
    files = [f"/data/watched/sub/f{i:02d}.txt" for i in range(40)]
    with sb.files.watch("/data/watched", recursive=True, timeout=HANG_DEADLINE_S * 2) as watch:
        burst = sb.run_code(
            "import os\nos.makedirs('/data/watched/sub/new')\n"
            "for i in range(40):\n    open(f'/data/watched/sub/f{i:02d}.txt', 'w').write('x' * i)\n"
            "for _ in range(20):\n    open('/data/watched/sub/f00.txt', 'a').write('more')\n"
            "open('/data/watched/sub/new/inner.txt', 'w').write('y')\n")
        assert burst.error is None, burst.error
        seen: list[dict] = []
        wanted = {("create", path) for path in files} | {("modify", "/data/watched/sub/f00.txt"),
                                                          ("create", "/data/watched/sub/new/inner.txt")}
        _collect(watch, wanted, seen)
        assert wanted <= {(e["type"], e["path"]) for e in seen}, seen
        assert not [e for e in seen if e["type"] == "overflow"]

        sb.files.remove("/data/watched/sub", recursive=True)
        gone = {("delete", path) for path in files} | {("delete", "/data/watched/sub/new/inner.txt"),
                                                       ("delete", "/data/watched/sub/new"),
                                                       ("delete", "/data/watched/sub")}
        deleted: list[dict] = []
        _collect(watch, gone, deleted)
        assert gone <= {(e["type"], e["path"]) for e in deleted}, deleted
        assert [e["is_dir"] for e in deleted if e["path"] == "/data/watched/sub"] == [True]
    # the watch ends when the watched directory goes
    with sb.files.watch("/data/watched", timeout=HANG_DEADLINE_S * 2) as watch:
        sb.files.remove("/data/watched", recursive=True)
        assert ("delete", "/data/watched") in {(e["type"], e["path"]) for e in watch}
        assert watch.end_reason == "deleted"


def test_a_non_recursive_watch_sees_only_its_directory(sb):
    sb.files.make_dir("/data/flat/inner")
    with sb.files.watch("/data/flat", timeout=HANG_DEADLINE_S * 2) as watch:
        sb.files.write("/data/flat/inner/hidden.txt", b"h")
        sb.files.write("/data/flat/shown.txt", b"s")
        seen: list[dict] = []
        _collect(watch, {("create", "/data/flat/shown.txt")}, seen)
    assert "/data/flat/inner/hidden.txt" not in {e["path"] for e in seen}, seen
    sb.files.remove("/data/flat", recursive=True)


# What user code (the `sandbox` user) plants, aimed at what only the agent (root) may touch or at files outside.
_PLANT = """
import os
os.makedirs('/data/trap/tree', exist_ok=True)
os.makedirs('/data/keep', exist_ok=True)
open('/data/keep/precious', 'w').write('kept')
for name, target in [('shadow', '/etc/shadow'), ('passwd', '/etc/passwd'), ('rootdir', '/root'),
                     ('environ', '/proc/1/environ'), ('etc', '/etc'), ('tree/out', '/data/keep')]:
    os.symlink(target, '/data/trap/' + name)
"""


def test_links_planted_by_user_code_cannot_reach_the_agents_files(sb, api):
    assert sb.run_code(_PLANT).error is None
    files = f"/v1/sandboxes/{sb.id}/files"
    passwd = sb.run_code("open('/etc/passwd').read()").text
    # reads through a link get what the sandbox user gets: nothing of root's
    for link in ("/data/trap/shadow", "/data/trap/environ"):
        assert "/data/trap" in _error(api.get(files, params={"path": link}), 422, "invalid")
    _error(api.get(f"{files}/list", params={"path": "/data/trap/rootdir"}), 422, "invalid")
    # writes through a link into root's directories are refused, and nothing lands there
    _error(api.put(files, params={"path": "/data/trap/rootdir/planted"}, content=b"x"), 422, "invalid")
    _error(api.put(files, params={"path": "/data/trap/etc/planted"}, content=b"x"), 422, "invalid")
    _error(api.post(f"{files}/mkdir", json={"path": "/data/trap/etc/made"}), 422, "invalid")
    _error(api.post(f"{files}/rename", json={"path": "/data/keep/precious", "to": "/data/trap/etc/moved"}),
           422, "invalid")
    assert sb.run_code("import os; [os.path.exists(p) for p in ('/etc/planted', '/etc/made', '/etc/moved')]"
                       ).text == "[False, False, False]"
    # an upload to a link replaces the link (a rename over it), never the file it points to
    assert api.put(files, params={"path": "/data/trap/passwd"}, content=b"mine").status_code == 200
    assert sb.run_code("open('/etc/passwd').read()").text == passwd
    assert sb.files.stat("/data/trap/passwd")["type"] == "file"
    # stat describes the link; remove takes the link away, not its target; a recursive remove does not follow
    link = sb.files.stat("/data/trap/shadow")
    assert (link["type"], link["target"]) == ("link", "/etc/shadow")
    sb.files.remove("/data/trap/etc")
    sb.files.remove("/data/trap/tree", recursive=True)
    assert sb.files.read("/data/keep/precious") == b"kept"
    assert sb.run_code("import os; os.path.isdir('/etc')").text == "True"
    # a watch is placed on directories only, never through a link
    _error(api.get(f"{files}/watch", params={"path": "/data/trap/rootdir"}), 422, "invalid")
    sb.files.remove("/data/trap", recursive=True)
    sb.files.remove("/data/keep", recursive=True)


def test_bad_paths_get_the_right_codes_and_name_the_path(sb, api):
    files = f"/v1/sandboxes/{sb.id}/files"
    sb.files.write("/data/bad/file.txt", b"f")
    assert "/data/bad/missing" in _error(api.get(f"{files}/stat", params={"path": "/data/bad/missing"}),
                                         404, "not_found")
    assert "/data/bad/missing" in _error(api.delete(files, params={"path": "/data/bad/missing"}), 404, "not_found")
    _error(api.post(f"{files}/rename", json={"path": "/data/bad/missing", "to": "/data/bad/x"}), 404, "not_found")
    _error(api.post(f"{files}/mkdir", json={"path": "/data/bad/no/such", "parents": False}), 404, "not_found")
    assert "/data/bad/file.txt" in _error(api.post(f"{files}/mkdir", json={"path": "/data/bad/file.txt"}),
                                          409, "already_exists")
    assert "/data/bad" in _error(api.delete(files, params={"path": "/data/bad"}), 409, "not_empty")
    _error(api.post(f"{files}/mkdir", json={"path": "/data/bad/file.txt/under"}), 422, "invalid")
    _error(api.get(files, params={"path": "/data/bad"}), 422, "invalid")  # a directory is not a file
    _error(api.get(f"{files}/watch", params={"path": "/data/bad/file.txt"}), 422, "invalid")
    _error(api.delete(files, params={"path": "/", "recursive": "true"}), 422, "invalid")
    _error(api.post(f"{files}/rename", json={"path": "/data/bad", "to": "/data/bad/inside"}), 422, "invalid")
    _error(api.get(f"{files}/stat", params={"path": "/etc/x\x00y"}), 422, "invalid")
    _error(api.post(f"{files}/mkdir", json={"path": "/data/a\x00b"}), 422, "invalid")
    _error(api.post(f"{files}/rename", json={"path": "/data/bad", "to": ""}), 422, "invalid")
    _error(api.delete(files, params={"path": "/data/bad", "recursive": "maybe"}), 422, "invalid")
    for depth in ("0", "33", "x"):
        _error(api.get(f"{files}/list", params={"path": "/data", "depth": depth}), 422, "invalid")
    for timeout in ("0", "3601", "soon"):
        _error(api.get(f"{files}/watch", params={"path": "/data", "timeout_s": timeout}), 422, "invalid")
    with pytest.raises(InvalidRequestError):  # outside anything the sandbox user may write
        sb.files.write("/etc/not-yours", b"x")
    with pytest.raises(NotFoundError):
        sb.files.stat("/data/bad/missing")
    sb.files.remove("/data/bad", recursive=True)


def test_watch_streams_are_bounded(sb, api):
    """A service process serves at most 4 watch streams at once: the fifth is 429 with Retry-After (that a closed
    stream frees its slot, and the guest's own bounds, are unit-tested)."""
    sb.files.make_dir("/data/many")
    opened = []
    try:
        for _ in range(4):
            opened.append(sb.files.watch("/data/many", timeout=HANG_DEADLINE_S * 2))
        refused = api.get(f"/v1/sandboxes/{sb.id}/files/watch", params={"path": "/data/many"})
        _error(refused, 429, "limit_reached")
        assert refused.headers["Retry-After"]
    finally:
        for watch in opened:
            watch.stop()
