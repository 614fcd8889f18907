"""API keys (service/keys.py): keyed hashes, stable ids, the key store and the key ring the API asks, and the
`appliance keys` commands that change the store."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from service.keys import (
    METRICS,
    TENANT,
    KeyRing,
    KeyStore,
    KeyStoreError,
    derived_id,
    key_hash,
)

SECRET, OTHER_SECRET = b"s" * 32, b"t" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> KeyStore:
    return KeyStore(tmp_path / "state", SECRET, clock)


@pytest.fixture
def ring(store, clock) -> KeyRing:
    return KeyRing(SECRET, store.path, [("env-key", TENANT), ("prom-key", METRICS)], clock)


def test_stored_hashes_are_keyed_and_versioned():
    stored = key_hash(SECRET, "apl_x")
    assert stored.startswith("h1:") and len(stored) == 3 + 64
    assert stored != key_hash(OTHER_SECRET, "apl_x")  # without the secret, no offline guessing
    assert hashlib.sha256(b"apl_x").hexdigest() not in stored


def test_configured_keys_get_the_same_id_wherever_the_secret_is_the_same(ring, store, clock):
    # Two nodes of a fleet: same secret, same key → same id (the owner of the key's sandboxes on every node).
    other_node = KeyRing(SECRET, store.path, [("env-key", TENANT)], clock)
    assert ring.lookup("env-key").key_id == other_node.lookup("env-key").key_id == derived_id(SECRET, "env-key")
    assert derived_id(SECRET, "env-key") != derived_id(OTHER_SECRET, "env-key")
    assert ring.lookup("prom-key").kind == METRICS and ring.lookup("env-key").kind == TENANT
    assert ring.lookup("nope") is None and ring.lookup("") is None and ring.lookup("x" * 10_000) is None


def test_the_store_is_private_atomic_and_holds_no_key(store, tmp_path):
    old = os.umask(0)
    try:
        entry, key = store.add("alice")
    finally:
        os.umask(old)
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    text = store.path.read_text()
    assert key not in text and key_hash(SECRET, key) in text
    assert sorted(p.name for p in store.path.parent.iterdir()) == [".keys.json.lock", "keys.json"]  # no drafts left
    assert entry["id"].startswith("key_") and entry["name"] == "alice" and entry["revoked"] is None
    with pytest.raises(KeyStoreError, match="exists already"):
        store.add("alice")


def test_the_ring_sees_added_and_revoked_keys_without_a_restart(store, ring):
    assert ring.lookup("whatever") is None  # no store yet
    entry, key = store.add("alice")
    assert ring.lookup(key).key_id == entry["id"]
    metrics_entry, metrics_key = store.add("prometheus", METRICS)
    assert ring.lookup(metrics_key).kind == METRICS
    store.revoke(entry["id"])
    assert ring.lookup(key) is None
    assert ring.lookup(metrics_key).key_id == metrics_entry["id"]  # the others are untouched
    with pytest.raises(KeyStoreError, match="revoked"):
        store.rotate(entry["id"], 60)


def test_a_rotated_key_keeps_its_id_and_the_old_secret_works_for_the_overlap(store, ring, clock):
    entry, old_key = store.add("alice")
    rotated, new_key = store.rotate(entry["id"], overlap_s=3600)
    assert rotated["id"] == entry["id"] and new_key != old_key
    assert ring.lookup(old_key).key_id == ring.lookup(new_key).key_id == entry["id"]
    clock.now += 3599
    assert ring.lookup(old_key) is not None
    clock.now += 1
    assert ring.lookup(old_key) is None and ring.lookup(new_key).key_id == entry["id"]
    _, newest = store.rotate(entry["id"], overlap_s=0)  # no overlap: the previous secret ends now
    assert ring.lookup(new_key) is None and ring.lookup(newest).key_id == entry["id"]
    assert len(store.list()[0]["secrets"]) == 1  # ended secrets are dropped from the file


def test_a_key_in_e2b_shape_stays_in_it_through_rotation_and_has_the_has_id_lookup(store, ring):
    entry, key = store.add("e2b-app", key_format="e2b")
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key) and ring.lookup(key).key_id == entry["id"]
    _, rotated = store.rotate(entry["id"], overlap_s=0)
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", rotated)
    assert ring.has_id(entry["id"])  # what the E2B access tokens ask
    store.revoke(entry["id"])
    assert not ring.has_id(entry["id"])
    _, plain = store.add("plain")
    assert plain.startswith("apl_")
    with pytest.raises(KeyStoreError, match="format"):
        store.add("odd", key_format="uuid")


def test_an_expired_key_is_refused(store, ring, clock):
    _, key = store.add("temp", expires=clock.now + 60)
    assert ring.lookup(key) is not None
    clock.now += 60
    assert ring.lookup(key) is None


def test_a_damaged_store_admits_none_of_its_keys_but_configured_keys_still_work(store, ring):
    _, key = store.add("alice")
    assert ring.lookup(key) is not None
    store.path.write_text("{not json")
    assert ring.lookup(key) is None and ring.lookup("env-key") is not None
    doc = {"keys": [{"id": "../../etc", "name": "x", "kind": TENANT, "secrets": [], "revoked": None,
                     "expires": None}]}
    store.path.write_text(json.dumps(doc))
    assert store.list() == []  # a malformed entry is dropped, never trusted


# ---- the CLI ------------------------------------------------------------------------------------------------


@pytest.fixture
def keys_cli(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(tmp_path / "state"))

    def run(*argv: str):
        return CliRunner().invoke(main, ["keys", *argv])

    return run


def _ring(tmp_path: Path) -> KeyRing:
    state = tmp_path / "state"
    return KeyRing((state / "deployment.secret").read_bytes(), state / "keys.json")


def test_cli_add_prints_the_key_once_and_the_service_accepts_it(keys_cli, tmp_path):
    added = keys_cli("add", "alice")
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()  # stdout is the key alone (scripts capture it); the rest goes to stderr
    assert key.startswith("apl_") and "\n" not in key
    key_id = _ring(tmp_path).lookup(key).key_id
    assert key_id in added.stderr and "only time" in added.stderr
    listed = keys_cli("list")
    assert key_id in listed.output and "alice" in listed.output and "active" in listed.output
    assert key not in listed.output and "h1:" not in listed.output
    as_json = json.loads(keys_cli("list", "--json").stdout)
    assert [(row["id"], row["kind"], row["source"]) for row in as_json] == [(key_id, "tenant", "store")]


def test_cli_rotate_and_revoke(keys_cli, tmp_path):
    key = keys_cli("add", "alice").stdout.strip()
    key_id = _ring(tmp_path).lookup(key).key_id
    rotated = keys_cli("rotate", key_id, "--overlap", "0s")
    assert rotated.exit_code == 0, rotated.output
    new_key = rotated.stdout.strip()
    ring = _ring(tmp_path)
    assert ring.lookup(new_key).key_id == key_id and ring.lookup(key) is None
    revoked = keys_cli("revoke", key_id)
    assert revoked.exit_code == 0 and key_id in revoked.output
    assert _ring(tmp_path).lookup(new_key) is None
    assert "revoked" in keys_cli("list").output


def test_cli_metrics_key_and_expiry(keys_cli, tmp_path):
    added = keys_cli("add", "prometheus", "--metrics", "--expires", "30d")
    assert added.exit_code == 0, added.output
    assert _ring(tmp_path).lookup(added.stdout.strip()).kind == METRICS
    assert "expires" in added.stderr


@pytest.mark.parametrize("argv, message", [
    (("revoke", "key_000000000000"), "no key key_000000000000"),
    (("rotate", "key_000000000000"), "no key key_000000000000"),
    (("add", "bad name"), "key name"),
    (("add", "x", "--expires", "2001-01-01"), "in the past"),
    (("rotate", "key_000000000000", "--overlap", "soon"), "a number and a unit"),
])
def test_cli_errors_are_one_line(keys_cli, argv, message):
    result = keys_cli(*argv)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_cli_lists_the_ids_of_configured_keys(keys_cli, monkeypatch, tmp_path):
    keys_cli("add", "alice")
    monkeypatch.setenv("APPLIANCE_API_KEYS", "env-one,env-two")
    rows = json.loads(keys_cli("list", "--json").stdout)
    secret = (tmp_path / "state" / "deployment.secret").read_bytes()
    assert [row["id"] for row in rows if row["source"] == "config"] == [derived_id(secret, "env-one"),
                                                                       derived_id(secret, "env-two")]


def test_a_service_with_a_tenant_key_in_the_store_makes_no_key_file(keys_cli, tmp_path):
    from service import settings

    spec = settings.load()
    keys_cli("add", "prometheus", "--metrics")  # a metrics key is no key for tenants: serve still makes one
    _, created = settings.resolve_api_keys(spec)
    assert created is not None
    (tmp_path / "state" / "api-key").unlink()
    key = keys_cli("add", "alice").stdout.strip()
    assert settings.resolve_api_keys(spec) == ([], None)
    assert not (tmp_path / "state" / "api-key").exists()
    config = settings.load_service_config()
    assert settings.key_ring(config).lookup(key) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can act for another user")
def test_root_keeps_the_files_the_service_users(keys_cli, tmp_path):
    # On a node the operator runs `appliance keys` as root while the service runs as its own user: what root makes
    # must stay that user's, or the service could not read its keys (and the secret would be refused).
    service_uid = 65534
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, service_uid, service_uid)
    assert keys_cli("add", "alice").exit_code == 0
    for name in ("keys.json", ".keys.json.lock", "deployment.secret"):
        info = (state / name).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (service_uid, 0o600), name
    assert keys_cli("add", "bob").exit_code == 0  # and root still reads the service user's secret
