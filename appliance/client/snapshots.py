"""Named snapshots in the SDK: `sandbox.snapshots.create(name)` saves a sandbox's live state under a name of this
key; `Sandbox.create(snapshot=name)` starts new sandboxes from it. list/get/delete work on all of this key's
snapshots, whichever sandbox they were taken of."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sandbox import Sandbox


class Snapshots:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(self, name: str) -> dict[str, Any]:
        """Save the sandbox's whole live state (memory, processes, files) as snapshot `name`; the sandbox keeps
        running. Raises SnapshotExistsError (409) if this key has one of that name, RateLimitError (429) past the
        key's frozen share, InsufficientStorageError (507) past the quota."""
        return self._sandbox._lifecycle("snapshots", json={"name": name}).json()

    def list(self) -> list[dict[str, Any]]:
        """This key's snapshots (dicts as the API describes them), oldest first."""
        return self._sandbox._api.request("GET", "/v1/snapshots").json()["snapshots"]

    def get(self, name: str) -> dict[str, Any]:
        return self._sandbox._api.request("GET", f"/v1/snapshots/{name}").json()

    def delete(self, name: str) -> None:
        """No new sandbox can start from it; sandboxes made from it keep running."""
        self._sandbox._api.request("DELETE", f"/v1/snapshots/{name}")
