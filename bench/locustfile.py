"""Locust scenarios against a running appliance API; every exec's output is checked against what it must print.

    APPLIANCE_LOAD_KEYS=key1,key2 locust -f bench/locustfile.py --headless -u 32 -r 4 -t 10m \
        --host http://127.0.0.1:8080 MixedUser

User classes (name one or more on the command line; bench/load_bench.py drives all three and prints the tables):
  MixedUser     (a) create, exec, files, fork, freeze/resume, delete, in a loop, each client on its own sandbox
  HotExecUser   (b) exec only, on its own sandbox (run beside sandboxes held idle)
  BurstCreator  (c) one create and a first exec, then it stops (spawn them all at once for a burst)

What counts (in OUTCOMES, printed at the end, and written as JSON to $APPLIANCE_LOAD_REPORT if set):
  - documented refusals: 409 sandbox_busy, 429 limit_reached, 507 insufficient_*, 503 not_ready; 429 and 503 must
    carry Retry-After (a missing one is counted as undocumented);
  - undocumented: any other status (every 5xx), a transport error or a timeout;
  - wrong outputs: an exec that answered 200 with other output than the code must print (a counter kept in the
    sandbox's namespace, so a lost namespace shows as a wrong number too);
  - lost outputs: an exec whose answer never came (transport error, timeout, 5xx, 410).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from locust import HttpUser, between, constant, events, task
from locust.exception import StopUser

DOCUMENTED = {409: "sandbox_busy", 429: "limit_reached", 503: "not_ready", 507: "insufficient_capacity"}
WITH_RETRY_AFTER = {429, 503}
EXEC_TIMEOUT_S = 120  # client side: an exec answer later than this is lost


@dataclass
class Outcomes:
    ok: Counter = field(default_factory=Counter)  # kind -> answered as expected
    documented: Counter = field(default_factory=Counter)  # "kind status code" -> refused as documented
    undocumented: Counter = field(default_factory=Counter)  # "kind status code" -> anything else
    wrong_outputs: list = field(default_factory=list)
    lost_outputs: int = 0
    execs_checked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def as_json(self) -> dict[str, Any]:
        return {"ok": dict(self.ok), "documented": dict(self.documented), "undocumented": dict(self.undocumented),
                "wrong_outputs": self.wrong_outputs[:20], "wrong_output_count": len(self.wrong_outputs),
                "lost_outputs": self.lost_outputs, "execs_checked": self.execs_checked}


OUTCOMES = Outcomes()
_TOUR = itertools.count()
_KEYS = itertools.cycle([key for key in os.environ.get("APPLIANCE_LOAD_KEYS", "").split(",") if key] or ["-"])


@events.quitting.add_listener
def _report(environment, **_kwargs) -> None:
    path = os.environ.get("APPLIANCE_LOAD_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(OUTCOMES.as_json(), out)
    else:
        print(json.dumps(OUTCOMES.as_json(), indent=1))


class Refused(Exception):
    """A documented refusal (409, 429, 503, 507): the step is skipped, the client goes on."""


class ApplianceUser(HttpUser):
    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {next(_KEYS)}"
        self.sandbox: str | None = None
        self.count = 0  # what the sandbox's counter must be now

    def on_stop(self) -> None:
        if self.sandbox:
            self.client.delete(f"/v1/sandboxes/{self.sandbox}", name="delete")

    # ---- one HTTP call, classified --------------------------------------------------------------------------------

    def call(self, kind: str, method: str, path: str, expect: int = 200, **kwargs: Any):
        """The response when it is the expected status; Refused for a documented refusal; None otherwise."""
        kwargs.setdefault("timeout", EXEC_TIMEOUT_S)
        refused = None
        with self.client.request(method, path, name=kind, catch_response=True, **kwargs) as response:
            status = response.status_code
            if status == expect:
                response.success()
                OUTCOMES.ok[kind] += 1
                return response
            label = f"{kind} {status} {_error_code(response)}"
            if status in DOCUMENTED and (status not in WITH_RETRY_AFTER or response.headers.get("Retry-After")):
                refused = label
                OUTCOMES.documented[label] += 1
            else:
                if status in WITH_RETRY_AFTER:
                    label += " without Retry-After"
                OUTCOMES.undocumented[label] += 1
            response.failure(label)
        if refused is not None:
            raise Refused(refused)
        return None

    def create(self, kind: str = "create") -> str | None:
        response = self.call(kind, "POST", "/v1/sandboxes", expect=201, json={"metadata": {"load": kind}})
        return response.json()["id"] if response is not None else None

    def checked_exec(self, sandbox: str, count_before: int, kind: str = "exec") -> int | None:
        """Add one to the sandbox's counter and check the answer; the new count, or None if it was refused."""
        nonce = secrets.token_hex(4)
        code = f"n = globals().get('n', 0) + 1\nprint(n, {nonce!r})"
        try:
            response = self.call(kind, "POST", f"/v1/sandboxes/{sandbox}/exec", json={"code": code})
        except Refused:
            return None
        with OUTCOMES.lock:
            OUTCOMES.execs_checked += 1
            if response is None:
                OUTCOMES.lost_outputs += 1
                return None
            result = response.json()
            expected = f"{count_before + 1} {nonce}\n"
            if result.get("stdout") != expected or result.get("error"):
                OUTCOMES.wrong_outputs.append({"sandbox": sandbox, "expected": expected,
                                               "got": result.get("stdout"), "error": result.get("error")})
                return None
        return count_before + 1

    def ensure_sandbox(self) -> bool:
        if self.sandbox is None:
            try:
                self.sandbox = self.create()
            except Refused:
                return False
            self.count = 0
        return self.sandbox is not None

    def exec_step(self) -> None:
        if not self.ensure_sandbox():
            return
        count = self.checked_exec(self.sandbox, self.count)
        if count is not None:
            self.count = count
        elif self._lost_state():
            self.sandbox = None

    def _lost_state(self) -> bool:
        """After a failed exec: is the sandbox's counter still the one we know? Else start over on a new sandbox."""
        try:
            response = self.call("exec", "POST", f"/v1/sandboxes/{self.sandbox}/exec",
                                 json={"code": "print(globals().get('n', 0))"})
        except Refused:
            return False
        return response is None or response.json().get("stdout") != f"{self.count}\n"


def _error_code(response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-" if response.status_code else f"transport: {response.error!s:.80}"


class MixedUser(ApplianceUser):
    """(a) every kind of call, each client on a sandbox of its own (no 409 expected)."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        super().on_start()
        # Some clients begin with a fork or a freeze, so even a short run makes each kind of call.
        first = next(_TOUR) % 4
        if first == 0:
            self.fork()
        elif first == 1:
            self.freeze_resume()

    @task(8)
    def exec(self) -> None:
        self.exec_step()

    @task(2)
    def files(self) -> None:
        if not self.ensure_sandbox():
            return
        data = secrets.token_bytes(int.from_bytes(secrets.token_bytes(2), "big") + 1)  # 1 B .. 64 KiB
        path = f"/tmp/load-{secrets.token_hex(4)}.bin"
        try:
            put = self.call("file write", "PUT", f"/v1/sandboxes/{self.sandbox}/files", params={"path": path},
                            data=data, headers={"Content-Type": "application/octet-stream"})
            if put is None:
                return
            got = self.call("file read", "GET", f"/v1/sandboxes/{self.sandbox}/files", params={"path": path})
            self.call("file list", "GET", f"/v1/sandboxes/{self.sandbox}/files/list", params={"path": "/tmp"})
        except Refused:
            return
        if got is not None and (got.content != data or put.json()["sha256"] != hashlib.sha256(data).hexdigest()):
            with OUTCOMES.lock:
                OUTCOMES.wrong_outputs.append({"sandbox": self.sandbox, "file": path, "sent": len(data),
                                               "got": len(got.content)})

    @task(1)
    def fork(self) -> None:
        if not self.ensure_sandbox():
            return
        try:
            forked = self.call("fork", "POST", f"/v1/sandboxes/{self.sandbox}/fork", expect=201, json={"n": 1})
        except Refused:
            return
        if forked is None:
            return
        copy = forked.json()["sandboxes"][0]["id"]
        self.checked_exec(copy, self.count, kind="exec in fork")  # the copy goes on from the source's counter
        self.call("delete", "DELETE", f"/v1/sandboxes/{copy}", expect=204)

    @task(1)
    def freeze_resume(self) -> None:
        if not self.ensure_sandbox():
            return
        try:
            if self.call("freeze", "POST", f"/v1/sandboxes/{self.sandbox}/freeze") is None:
                return
            self.call("resume", "POST", f"/v1/sandboxes/{self.sandbox}/resume")
        except Refused:
            return
        self.exec_step()  # the counter survived the round trip through the disk

    @task(1)
    def recreate(self) -> None:
        if self.sandbox is not None:
            try:
                self.call("delete", "DELETE", f"/v1/sandboxes/{self.sandbox}", expect=204)
            except Refused:
                return
            self.sandbox = None
        self.ensure_sandbox()


class HotExecUser(ApplianceUser):
    """(b) exec, exec, exec on its own sandbox: the latency others feel while sandboxes sit idle."""

    @task
    def exec(self) -> None:
        self.exec_step()


class BurstCreator(ApplianceUser):
    """(c) one create, its first exec checked, delete, stop."""

    @task
    def once(self) -> None:
        try:
            sandbox = self.create("burst create")
        except Refused:
            raise StopUser() from None
        if sandbox is not None:
            self.checked_exec(sandbox, 0, kind="burst first exec")
            self.call("delete", "DELETE", f"/v1/sandboxes/{sandbox}", expect=204)
        raise StopUser()
