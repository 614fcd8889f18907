"""The agent's file operations beyond read/write/list (fileops.py), recursive listing, atomic uploads, and watches
with real inotify (filewatch.py), run here against a temporary directory."""

from __future__ import annotations

import os

import pytest
from appliance_agent import fileops, files, filewatch, frames, protocol

H = fileops.HANDLERS


def _code(op: str, **message) -> tuple[str, str]:
    with pytest.raises(files.FileOpError) as failed:
        H[op](message)
    return failed.value.code, failed.value.message


def test_every_op_the_agent_serves_is_a_protocol_op():
    assert set(H) <= protocol.OPS and set(protocol.FILE_OPS) <= set(H)


def test_stat_describes_links_without_following_them(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "l").symlink_to("/etc/shadow")
    info = H["file_stat"]({"path": str(tmp_path / "f")})[0]
    assert (info["name"], info["type"], info["size"]) == ("f", "file", 3)
    assert info["mode"] == os.stat(tmp_path / "f").st_mode & 0o7777
    link = H["file_stat"]({"path": str(tmp_path / "l")})[0]
    assert (link["type"], link["target"]) == ("link", "/etc/shadow")
    code, message = _code("file_stat", path=str(tmp_path / "none"))
    assert code == "not_found" and str(tmp_path / "none") in message


def test_remove_takes_links_not_their_targets_and_needs_recursive_for_a_full_directory(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("kept")
    tree = tmp_path / "tree" / "sub"
    tree.mkdir(parents=True)
    (tree / "out").symlink_to(keep)
    (tmp_path / "link").symlink_to(keep / "precious")
    H["file_remove"]({"path": str(tmp_path / "link")})
    assert (keep / "precious").read_text() == "kept"
    code, message = _code("file_remove", path=str(tmp_path / "tree"))
    assert code == "not_empty" and str(tmp_path / "tree") in message
    H["file_remove"]({"path": str(tmp_path / "tree"), "recursive": True})
    assert not (tmp_path / "tree").exists() and (keep / "precious").read_text() == "kept"
    assert _code("file_remove", path=str(tmp_path / "none"))[0] == "not_found"


def test_remove_refuses_the_root_directory_and_never_reaches_it(monkeypatch):
    """Run on the HOST as root: the removal calls are replaced first, so a broken guard fails this test instead of
    emptying the host's root directory (which a mutation run of the guard once did to /etc)."""

    def never(*args, **kwargs):
        raise AssertionError(f"remove reached the filesystem for the root directory: {args}")

    for name in ("rmtree",):
        monkeypatch.setattr(fileops.shutil, name, never)
    for name in ("unlink", "rmdir", "remove"):
        monkeypatch.setattr(fileops.os, name, never)
    for path in ("/", "//", "/./", "/etc/.."):
        assert _code("file_remove", path=path, recursive=True)[0] == "invalid_path"


def test_make_dir_is_mkdir_p_and_refuses_a_file_in_its_place(tmp_path):
    deep = str(tmp_path / "a" / "b" / "c")
    assert H["file_mkdir"]({"path": deep, "parents": True})[0] == {"created": True}
    assert H["file_mkdir"]({"path": deep, "parents": True})[0] == {"created": False}
    (tmp_path / "file").write_bytes(b"")
    assert _code("file_mkdir", path=str(tmp_path / "file"), parents=True)[0] == "already_exists"
    assert _code("file_mkdir", path=str(tmp_path / "x" / "y"))[0] == "not_found"  # no parents
    assert _code("file_mkdir", path=str(tmp_path / "file" / "under"), parents=True)[0] == "not_a_directory"


def test_rename_moves_and_only_overwrites_when_asked(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    code, message = _code("file_rename", path=str(tmp_path / "a"), to=str(tmp_path / "b"))
    assert code == "already_exists" and str(tmp_path / "b") in message
    H["file_rename"]({"path": str(tmp_path / "a"), "to": str(tmp_path / "b"), "overwrite": True})
    assert (tmp_path / "b").read_text() == "a" and not (tmp_path / "a").exists()
    (tmp_path / "d").mkdir()
    assert _code("file_rename", path=str(tmp_path / "d"), to=str(tmp_path / "d" / "in"))[0] == "invalid_path"
    assert _code("file_rename", path=str(tmp_path / "none"), to=str(tmp_path / "x"))[0] == "not_found"
    assert _code("file_rename", path=str(tmp_path / "b"), to="")[0] == "invalid_path"


def test_an_upload_stays_under_a_temporary_name_until_committed(tmp_path):
    target, token = str(tmp_path / "sub" / "f.txt"), "0123456789abcdef"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.txt").write_text("old")
    files.file_write({"path": target, "upload": token, frames.PAYLOAD_KEY: b"new "})
    files.file_write({"path": target, "upload": token, "append": True, frames.PAYLOAD_KEY: b"bytes"})
    assert (tmp_path / "sub" / "f.txt").read_text() == "old"
    assert H["file_commit"]({"path": target, "upload": token})[0] == {"size": 9}
    assert os.listdir(tmp_path / "sub") == ["f.txt"] and (tmp_path / "sub" / "f.txt").read_text() == "new bytes"
    files.file_write({"path": target, "upload": token, frames.PAYLOAD_KEY: b"dropped"})
    H["file_commit"]({"path": target, "upload": token, "abort": True})
    assert os.listdir(tmp_path / "sub") == ["f.txt"] and (tmp_path / "sub" / "f.txt").read_text() == "new bytes"
    long = str(tmp_path / ("n" * 255))  # the temporary name stays under NAME_MAX
    files.file_write({"path": long, "upload": token, frames.PAYLOAD_KEY: b"x"})
    H["file_commit"]({"path": long, "upload": token})
    assert os.path.getsize(long) == 1
    for bad in ("../../x", "ABCDEF0123", "12", None):
        assert _code("file_commit", path=target, upload=bad)[0] == "invalid_path"


def _walk(path: str, limit: int, depth: int) -> list[str]:
    names, after = [], None
    for _ in range(100):  # a cursor that does not advance would loop
        reply = H["list_dir"]({"path": path, "limit": limit, "depth": depth,
                               **({} if after is None else {"after": after})})[0]
        assert len(reply["entries"]) <= limit
        names += [entry["name"] for entry in reply["entries"]]
        if not reply["more"]:
            return names
        after = reply["after"]
    raise AssertionError("the listing did not end")


def test_a_recursive_listing_pages_through_the_same_walk_at_any_page_size(tmp_path):
    for directory in ("a/b/c", "a/d", "e", "e/f"):
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
    for name in ("a/x", "a/b/y", "a/b/c/z", "e/w", "top"):
        (tmp_path / name).write_bytes(b"1")
    (tmp_path / "e" / "loop").symlink_to(tmp_path)  # listed, never followed
    whole = ["a", "a/b", "a/b/c", "a/b/c/z", "a/b/y", "a/d", "a/x", "e", "e/f", "e/loop", "e/w", "top"]
    for limit in (1, 2, 3, 5, 1000):
        assert _walk(str(tmp_path), limit, 32) == whole, limit
    assert _walk(str(tmp_path), 2, 2) == ["a", "a/b", "a/d", "a/x", "e", "e/f", "e/loop", "e/w", "top"]
    entry = H["list_dir"]({"path": str(tmp_path), "depth": 4})[0]["entries"][3]
    assert entry["path"] == str(tmp_path / "a" / "b" / "c" / "z")
    # a page resumes after its cursor even when that entry went away in between
    first = H["list_dir"]({"path": str(tmp_path), "limit": 2, "depth": 32})[0]
    assert first["after"] == "a/b"
    os.rename(tmp_path / "a" / "b", tmp_path / "a" / "bb")
    rest = H["list_dir"]({"path": str(tmp_path), "limit": 1000, "depth": 32, "after": first["after"]})[0]
    assert [e["name"] for e in rest["entries"]][:3] == ["a/bb", "a/bb/c", "a/bb/c/z"]
    for depth in (0, 33, "2", True):
        assert _code("list_dir", path=str(tmp_path), depth=depth)[0] == "io_error"


def _poll(key: str) -> dict:
    return H["watch_poll"]({"watch": key})[0]


def test_a_recursive_watch_sees_a_burst_new_directories_and_a_recursive_delete(tmp_path):
    key = H["watch_start"]({"path": str(tmp_path), "recursive": True})[0]["watch"]
    try:
        (tmp_path / "new" / "deeper").mkdir(parents=True)  # made before its watch: announced by the scan
        for i in range(30):
            (tmp_path / "new" / "deeper" / f"f{i}").write_text("x")
        with open(tmp_path / "busy", "w") as handle:
            for _ in range(50):
                handle.write("more")
                handle.flush()
        events = _poll(key)["events"]
        kinds = {(e["type"], e["path"]) for e in events}
        assert {("create", str(tmp_path / "new" / "deeper" / f"f{i}")) for i in range(30)} <= kinds
        assert [e["type"] for e in events if e["path"] == str(tmp_path / "busy")] == ["create", "modify"]
        H["file_remove"]({"path": str(tmp_path / "new"), "recursive": True})
        gone = {(e["type"], e["path"], e["is_dir"]) for e in _poll(key)["events"]}
        assert ("delete", str(tmp_path / "new"), True) in gone
        assert {("delete", str(tmp_path / "new" / "deeper" / f"f{i}"), False) for i in range(30)} <= gone
    finally:
        H["watch_stop"]({"watch": key})


def test_a_flat_watch_sees_its_directory_only_and_ends_when_it_goes(tmp_path):
    (tmp_path / "w" / "inner").mkdir(parents=True)
    key = H["watch_start"]({"path": str(tmp_path / "w")})[0]["watch"]
    (tmp_path / "w" / "inner" / "hidden").write_text("h")
    (tmp_path / "w" / "shown").write_text("s")
    assert {e["path"] for e in _poll(key)["events"]} == {str(tmp_path / "w" / "shown")}
    H["file_remove"]({"path": str(tmp_path / "w"), "recursive": True})
    last = _poll(key)
    assert last["ended"] and ("delete", str(tmp_path / "w")) in {(e["type"], e["path"]) for e in last["events"]}
    assert _code("watch_poll", watch=key)[0] == "not_found"  # an ended watch is gone


def test_watches_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(filewatch, "MAX_QUEUE", 5)
    monkeypatch.setattr(filewatch, "MAX_REPLY", 3)
    key = H["watch_start"]({"path": str(tmp_path)})[0]["watch"]
    try:
        for i in range(10):
            (tmp_path / f"f{i}").write_bytes(b"")
        first = _poll(key)
        assert first["overflow"] and len(first["events"]) == 3 and first["more"]
        second = _poll(key)
        assert not second["overflow"] and len(second["events"]) == 2 and not second["more"]
        keys = [H["watch_start"]({"path": str(tmp_path)})[0]["watch"] for _ in range(filewatch.MAX_WATCHES - 1)]
        code, message = _code("watch_start", path=str(tmp_path))
        assert code == "limit_reached" and str(tmp_path) in message
        for other in keys:
            H["watch_stop"]({"watch": other})
        monkeypatch.setattr(filewatch, "MAX_DIRS", 2)
        for name in ("a", "b", "c"):
            (tmp_path / name).mkdir()
        assert _code("watch_start", path=str(tmp_path), recursive=True)[0] == "limit_reached"
        monkeypatch.setattr(filewatch, "IDLE_S", -1.0)  # a watch nobody polls goes away
        H["watch_stop"]({"watch": "none"})
        assert _code("watch_poll", watch=key)[0] == "not_found"
    finally:
        H["watch_stop"]({"watch": key})


def test_a_watch_is_placed_on_a_directory_never_through_a_link(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    (tmp_path / "f").write_bytes(b"")
    assert _code("watch_start", path=str(tmp_path / "l"))[0] == "not_a_directory"
    assert _code("watch_start", path=str(tmp_path / "f"))[0] == "not_a_directory"
    assert _code("watch_start", path=str(tmp_path / "none"))[0] == "not_found"


def test_inotify_records_parse_and_map_to_event_types():
    import struct

    record = struct.pack("iIII", 3, 0x100, 0, 8) + b"name\0\0\0\0" + struct.pack("iIII", 4, 0x2, 0, 0)
    assert filewatch.parse(record) == [(3, 0x100, "name"), (4, 0x2, "")]
    assert [filewatch.kind_of(mask) for mask in (0x100, 0x80, 0x200, 0x40, 0x2, 0x4)] == [
        "create", "create", "delete", "delete", "modify", None]
