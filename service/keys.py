"""API keys: how they are hashed and named, the key store `appliance keys` writes, and the key ring the API's
auth asks on every request.

- A key is kept only as `h1:<HMAC-SHA256>` keyed with the deployment's secret (service/engine/deployment_secret.py):
  a leaked registry or key store allows no offline guessing without the secret. `h1` names the scheme, so another
  can come later beside it.
- Every key has a stable id (`key_<12 hex>`): sandboxes are owned by key id, never by the key or its hash, so a key
  rotated in the store keeps its sandboxes. Keys from the environment or the spec (APPLIANCE_API_KEYS, the Ansible
  role) get an id derived from the key by an HMAC with the same secret: the same key has the same id on every node of
  a fleet that shares the secret.
- The store is `<state_dir>/keys.json` (0600, replaced atomically, one writer at a time under a lock file); the
  running service re-reads it when the file changes (one stat per request), so added, rotated and revoked keys take
  effect without a restart.
- Two kinds: `tenant` keys own sandboxes; `metrics` keys may only read /metrics (and tenant keys may not).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HASH_VERSION = "h1"
TENANT, METRICS = "tenant", "metrics"
KINDS = (TENANT, METRICS)
STORE_FILE = "keys.json"
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{12}$")
LEGACY_OWNER_RE = re.compile(r"^[0-9a-f]{64}$")  # registries from before key ids
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_STORE_BYTES = 4 << 20  # a store of ~10k keys; a bigger file is refused, not read whole
MAX_KEY_CHARS = 512  # longer bearer tokens are refused before they are hashed


class KeyStoreError(Exception):
    """A key store that cannot be read or changed as asked (one line, for the CLI)."""


# ---- hashing and ids ------------------------------------------------------------------------------------------


def key_hash(secret: bytes, key: str) -> str:
    """What is stored and compared for `key`: versioned, keyed with the deployment secret."""
    digest = hmac.new(secret, b"appliance-api-key-v1\0" + key.encode(), hashlib.sha256).hexdigest()
    return f"{HASH_VERSION}:{digest}"


def derived_id(secret: bytes, key: str) -> str:
    """The id of a key from the environment or the spec: the same on every node that shares the secret."""
    return "key_" + hmac.new(secret, b"appliance-key-id-v1\0" + key.encode(), hashlib.sha256).hexdigest()[:12]


def legacy_owner(key: str) -> str:
    """The owner column of registries from before key ids (unsalted SHA-256 of the key). Computed only to find and
    migrate such rows (SandboxManager on open); never stored again."""
    return hashlib.sha256(key.encode()).hexdigest()


KEY_FORMATS = ("appliance", "e2b")


def new_key(key_format: str = "appliance") -> str:
    """A new key. "e2b": E2B's shape (`e2b_` and 40 hex digits, 160 bits), which some of E2B's SDKs insist on before
    they send it (the E2B-compatible API, service/compat/e2b); rotating such a key keeps its shape."""
    if key_format == "e2b":
        return "e2b_" + secrets.token_hex(20)
    return "apl_" + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


@dataclass(frozen=True)
class Credential:
    """Who a request is: the key's id (the owner of its sandboxes; safe to log), its name and kind."""

    key_id: str
    name: str
    kind: str


# ---- the store ------------------------------------------------------------------------------------------------


def _valid_entry(entry: Any) -> bool:
    """The shape of one stored key; anything else in the file is ignored (with a log line), never trusted."""
    if not isinstance(entry, dict):
        return False
    secrets_ = entry.get("secrets")
    return (isinstance(entry.get("id"), str) and KEY_ID_RE.match(entry["id"]) is not None
            and isinstance(entry.get("name"), str) and entry.get("kind") in KINDS
            and isinstance(secrets_, list) and all(
                isinstance(item, dict) and isinstance(item.get("hmac"), str)
                and item["hmac"].startswith(f"{HASH_VERSION}:")
                and isinstance(item.get("valid_until"), (int, float, type(None))) for item in secrets_)
            and isinstance(entry.get("revoked"), (int, float, type(None)))
            and isinstance(entry.get("expires"), (int, float, type(None))))


def read_store(path: Path) -> list[dict[str, Any]]:
    """The keys in the store at `path` ([] if there is none). Bounded, no-follow; malformed entries are dropped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_STORE_BYTES + 1)
    if len(data) > MAX_STORE_BYTES:
        raise KeyStoreError(f"the key store {path} is larger than {MAX_STORE_BYTES} bytes; refusing to read it")
    try:
        document = json.loads(data or b"{}")
    except ValueError as exc:
        raise KeyStoreError(f"the key store {path} is not valid JSON ({exc})") from None
    entries = document.get("keys", []) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyStoreError(f"the key store {path} has no list of keys")
    valid = [entry for entry in entries if _valid_entry(entry)]
    if len(valid) != len(entries):
        log.error("the key store %s has %d malformed entries; they are ignored", path, len(entries) - len(valid))
    return valid


class KeyStore:
    """`<state_dir>/keys.json` as `appliance keys` changes it: read, change, written whole beside it and renamed
    into place (readers never see half a file), under an exclusive lock so two operators do not lose a change.
    Files get the state directory's owner (the CLI may run as root, the service as its own user)."""

    def __init__(self, state_dir: Path, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STORE_FILE
        self._secret = secret
        self._clock = clock

    def list(self) -> list[dict[str, Any]]:
        return read_store(self.path)

    def add(self, name: str, kind: str = TENANT, expires: float | None = None,
            key_format: str = "appliance") -> tuple[dict[str, Any], str]:
        """A new key: (its entry, the key itself: the only time it exists outside a client)."""
        if not NAME_RE.match(name):
            raise KeyStoreError(f"key name {name!r}: use 1-64 letters, digits and . _ @ - (starting with a letter "
                                "or digit)")
        if kind not in KINDS:
            raise KeyStoreError(f"key kind {kind!r}: one of {', '.join(KINDS)}")
        if key_format not in KEY_FORMATS:
            raise KeyStoreError(f"key format {key_format!r}: one of {', '.join(KEY_FORMATS)}")
        key, now = new_key(key_format), self._clock()
        with self._changing() as entries:
            if any(entry["name"] == name and entry["revoked"] is None for entry in entries):
                raise KeyStoreError(f"a key named {name!r} exists already (rotate it, or revoke it first)")
            taken = {entry["id"] for entry in entries}
            key_id = new_key_id()
            while key_id in taken:
                key_id = new_key_id()
            entry = {"id": key_id, "name": name, "kind": kind, "created": now, "expires": expires, "revoked": None,
                     "format": key_format,
                     "secrets": [{"hmac": key_hash(self._secret, key), "created": now, "valid_until": None}]}
            entries.append(entry)
        return entry, key

    def rotate(self, key_id: str, overlap_s: float) -> tuple[dict[str, Any], str]:
        """A new secret for the same key id (same owner, same sandboxes); the current ones stay valid for
        `overlap_s` more seconds, so clients can switch without a failed call."""
        now = self._clock()
        with self._changing() as entries:
            entry = self._live(entries, key_id)
            key = new_key("e2b" if entry.get("format") == "e2b" else "appliance")
            for item in entry["secrets"]:
                if item["valid_until"] is None or item["valid_until"] > now + overlap_s:
                    item["valid_until"] = now + overlap_s
            entry["secrets"] = [item for item in entry["secrets"] if item["valid_until"] > now]  # expired: gone
            entry["secrets"].append({"hmac": key_hash(self._secret, key), "created": now, "valid_until": None})
        return entry, key

    def revoke(self, key_id: str) -> dict[str, Any]:
        with self._changing() as entries:
            entry = self._live(entries, key_id)
            entry["revoked"] = self._clock()
            entry["secrets"] = []  # nothing of a revoked key is worth keeping
        return entry

    @staticmethod
    def _live(entries: list[dict[str, Any]], key_id: str) -> dict[str, Any]:
        for entry in entries:
            if entry["id"] == key_id:
                if entry["revoked"] is not None:
                    raise KeyStoreError(f"key {key_id} is revoked")
                return entry
        raise KeyStoreError(f"no key {key_id} in the key store (see `appliance keys list`)")

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[dict[str, Any]]]:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = os.stat(self.state_dir)
        lock_fd = os.open(self.state_dir / f".{STORE_FILE}.lock",
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
                os.fchown(lock_fd, owner.st_uid, owner.st_gid)  # the service's user may change the store next
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            entries = read_store(self.path)
            yield entries
            self._write(entries, owner.st_uid, owner.st_gid)
        finally:
            os.close(lock_fd)

    def _write(self, entries: list[dict[str, Any]], uid: int, gid: int) -> None:
        draft = self.path.with_name(f".{STORE_FILE}.{secrets.token_hex(6)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                os.fchmod(handle.fileno(), 0o600)  # whatever the umask
                if os.geteuid() == 0 and (uid, gid) != (0, 0):
                    os.fchown(handle.fileno(), uid, gid)  # the service's user must read what root wrote
                json.dump({"version": 1, "keys": entries}, handle, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(draft, self.path)
        finally:
            draft.unlink(missing_ok=True)
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ---- the key ring (what auth asks) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    credential: Credential
    valid_until: float | None  # this secret's end (a rotation's overlap), or the key's expiry


class KeyRing:
    """Key → Credential for the API: the configured keys (environment, spec, key file; fixed for the process's life)
    and the store's (re-read when the file changes: one stat per lookup, a parse only after a change)."""

    def __init__(self, secret: bytes, store_path: Path, configured: Iterable[tuple[str, str]] = (),
                 clock: Callable[[], float] = time.time) -> None:
        """`configured`: (key, kind) pairs."""
        self._secret = secret
        self._store_path = store_path
        self._clock = clock
        self._configured: dict[str, Credential] = {}
        for index, (key, kind) in enumerate(configured):
            name = f"{kind}-configured-{index + 1}"
            self._configured[key_hash(secret, key)] = Credential(derived_id(secret, key), name, kind)
        self._stored: dict[str, _Stored] = {}
        self._seen: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def lookup(self, key: str) -> Credential | None:
        """The key's credential, or None (unknown, revoked, expired, or past its rotation overlap)."""
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        digest = key_hash(self._secret, key)
        found = self._configured.get(digest)
        if found is not None:
            return found
        stored = self._store().get(digest)
        if stored is None or (stored.valid_until is not None and self._clock() >= stored.valid_until):
            return None
        return stored.credential

    def has_id(self, key_id: str) -> bool:
        """Whether a key of this id is valid now (a configured one, or a stored one neither revoked nor expired):
        credentials derived from a key (E2B's in-sandbox access tokens) die with it."""
        if any(credential.key_id == key_id for credential in self._configured.values()):
            return True
        now = self._clock()
        return any(stored.credential.key_id == key_id and (stored.valid_until is None or now < stored.valid_until)
                   for stored in self._store().values())

    def _store(self) -> dict[str, _Stored]:
        try:
            info = os.stat(self._store_path)
            seen = (info.st_ino, info.st_mtime_ns, info.st_size)  # an atomic replace always makes a new inode
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return self._stored
        with self._lock:
            if seen != self._seen:
                self._stored = self._load() if seen is not None else {}
                self._seen = seen
        return self._stored

    def _load(self) -> dict[str, _Stored]:
        try:
            entries = read_store(self._store_path)
        except (KeyStoreError, OSError) as exc:
            # Fail closed: a store that cannot be read admits none of its keys (a revoke must never be undone
            # by a damaged file); the configured keys still work.
            log.error("key store unreadable, its keys are refused until it is fixed: %s", exc)
            return {}
        table: dict[str, _Stored] = {}
        for entry in entries:
            if entry["revoked"] is not None:
                continue
            credential = Credential(entry["id"], entry["name"], entry["kind"])
            for item in entry["secrets"]:
                ends = [end for end in (item["valid_until"], entry["expires"]) if end is not None]
                table[item["hmac"]] = _Stored(credential, min(ends) if ends else None)
        return table

    def configured_ids(self) -> list[str]:
        return sorted({credential.key_id for credential in self._configured.values()})


def _orphan(secret: bytes, old_owner: str) -> str:
    return "orphan_" + hmac.new(secret, b"appliance-orphan-v1\0" + old_owner.encode(), hashlib.sha256).hexdigest()[:24]


def owner_migration(secret: bytes, keys: Iterable[str], found: Iterable[str]) -> dict[str, str]:
    """{owner found in an older registry: its new owner}. An owner of the old form (the SHA-256 of a key) becomes
    that key's id if the key is configured; else a keyed name (`orphan_...`), so no unsalted hash of a key stays on
    disk, and the rows still go to the key's id if it is configured again later."""
    ids = {legacy_owner(key): derived_id(secret, key) for key in keys}
    ids |= {_orphan(secret, old): key_id for old, key_id in ids.items()}
    moves = {}
    for owner in found:
        if owner in ids:
            moves[owner] = ids[owner]
        elif LEGACY_OWNER_RE.match(owner):
            moves[owner] = _orphan(secret, owner)
    return moves
