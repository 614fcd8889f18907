"""/files: upload, download and listing, streamed in bounded chunks."""
from __future__ import annotations

import hashlib

import falcon
import falcon.inspect
import falcon.testing

from service.api import create_app

from .api_helpers import A, assert_error
from .fakes import fake_manager, make_config


def test_file_round_trip_and_listing(client, manager, sandbox_id):
    data = bytes(range(256)) * 100
    files = f"/v1/sandboxes/{sandbox_id}/files"
    written = client.simulate_put(files, params={"path": "/data/blob.bin"}, body=data, headers=A)
    assert written.status_code == 200
    assert written.json == {"path": "/data/blob.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    read = client.simulate_get(files, params={"path": "/data/blob.bin"}, headers=A)
    assert read.content == data and int(read.headers["content-length"]) == len(data)
    assert read.headers["content-type"] == "application/octet-stream"
    listing = client.simulate_get(f"{files}/list", params={"path": "/data"}, headers=A).json
    assert listing == {
        "path": "/data",
        "entries": [{"name": "blob.bin", "type": "file", "size": len(data), "mtime": 0.0}],
        "more": False, "cursor": None,
    }


def test_listing_comes_in_pages_with_a_cursor(client, sandbox_id):
    files = f"/v1/sandboxes/{sandbox_id}/files"
    names = [f"f{i:02d}" for i in range(7)]
    for name in reversed(names):
        client.simulate_put(files, params={"path": f"/d/{name}"}, body=b"x", headers=A)
    seen, cursor, pages = [], None, 0
    for _ in range(10):  # a cursor that does not advance would loop: 10 pages is far past 3
        params = {"path": "/d", "limit": "3", **({} if cursor is None else {"cursor": cursor})}
        page = client.simulate_get(f"{files}/list", params=params, headers=A).json
        assert len(page["entries"]) <= 3
        seen += [entry["name"] for entry in page["entries"]]
        pages += 1
        if not page["more"]:
            assert page["cursor"] is None
            break
        cursor = page["cursor"]
    assert (seen, pages) == (names, 3)
    for bad in ({"limit": "0"}, {"limit": "10001"}, {"limit": "x"}, {"cursor": "a/b"}, {"cursor": "n" * 256}):
        result = client.simulate_get(f"{files}/list", params={"path": "/d", **bad}, headers=A)
        assert assert_error(result, 422, "invalid")["field"] == next(iter(bad))


def test_upload_is_handed_on_in_chunks(tmp_path):
    config = make_config(tmp_path / "big", max_file_bytes=8 << 20)
    manager, engine = fake_manager(config)
    client = falcon.testing.TestClient(create_app(config, manager))
    sandbox_id = client.simulate_post("/v1/sandboxes", headers=A).json["id"]
    data = b"z" * (3 << 20)
    result = client.simulate_put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/f"}, body=data, headers=A)
    assert result.json["size"] == len(data)
    assert len(engine.upload_chunk_sizes) >= 3 and max(engine.upload_chunk_sizes) <= 1 << 20
    assert client.simulate_get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/f"}, headers=A).content == data
    manager.close()


def test_file_path_is_required(client, sandbox_id):
    result = client.simulate_get(f"/v1/sandboxes/{sandbox_id}/files", headers=A)
    assert assert_error(result, 422, "invalid")["field"] == "path"
