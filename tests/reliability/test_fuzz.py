"""The API fuzzed from its own contract: Schemathesis reads /v1/openapi.json of a live service and sends what it
generates (valid and invalid bodies, parameters, methods, credentials) to every route, then follows the document's
links through create -> exec -> fork -> freeze -> resume -> delete.

Every answer is checked: no 5xx; the status is one the document lists for that route and the body matches its schema
(Schemathesis's built-in checks); every error is the JSON error shape; what the schema allows is not refused as
invalid; and the other key never sees the first key's sandbox.

    make fuzz      the long run: APPLIANCE_FUZZ_EXAMPLES=300 APPLIANCE_FUZZ_SCENARIOS=60

Three deliberate narrowings. Two keep each case cheap on a TCG host: a schema-valid create asks for the spec's size
(a sized create is a fresh boot of seconds; the integration tests cover it), and a valid exec stops within 10 s. The
third keeps a linked sequence meaningful: a schema-valid create idles at least IDLE_FLOOR_S, so the reaper does not
close it between two links (a sandbox with `timeout_s: 1e-9` is really gone a few seconds later, as it should be).
A schema-valid GET /metrics carries the metrics key, the only key that route accepts.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.result import Ok
from schemathesis.pytest.lazy import get_all_tests  # see the first test
from schemathesis.specs.openapi.checks import ensure_resource_availability

from tests.live_service import LiveService
from tests.reliability.conftest import delete_all, error_shape_problem

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("APPLIANCE_FUZZ_EXAMPLES", "100"))  # fuzzing phase, per operation
SCENARIOS = int(os.environ.get("APPLIANCE_FUZZ_SCENARIOS", "5"))  # stateful phase: linked call sequences
MIN_CASES = int(os.environ.get("APPLIANCE_FUZZ_MIN_CASES", "1000"))
EXEC_TIMEOUT_CAP_S = 10.0
IDLE_FLOOR_S = 600.0
# A 422 that a schema-valid request may get: what the host can or cannot do, not what the request says.
RUNTIME_422 = frozenset({"network_unavailable", "snapshot_incompatible", "snapshot_invalid"})
# Routes of one sandbox whose generated calls are pointed at a real sandbox half the time (the rest get 404);
# fork, freeze, resume and delete reach real sandboxes through the links of the stateful phase.
ON_TARGET = frozenset({"getSandbox", "exec", "interrupt", "writeFile", "readFile", "listDir"})
FILE_OPERATIONS = frozenset({"writeFile", "readFile", "listDir", "removeFile", "statFile", "makeDir", "renameFile",
                             "watchDir"})
# Routes whose 404 may name something inside a live sandbox (a path, a command id), not the sandbox: Schemathesis's
# "created resource not found" check cannot tell the two apart, so it is left out for them (the body says which).
INNER_404 = FILE_OPERATIONS | {"getCommand", "readCommandOutput", "writeCommandStdin", "signalCommand"}
SETTINGS = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}


class FuzzRun:
    """What every generated call goes through: aim, send, count, clean up what it created."""

    def __init__(self, live: LiveService, target: str) -> None:
        self.live = live
        self.target = target
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self._own = live.client()
        self._other = live.client(live.other_key)

    def prepare(self, case: schemathesis.Case) -> None:
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        operation = case.operation.definition.raw.get("operationId")
        if operation == "createSandbox" and positive and isinstance(case.body, dict):
            case.body.pop("vcpus", None)
            case.body.pop("memory_mib", None)
            if case.body.get("snapshot") is not None:  # a snapshot has its own size and state: not with template
                case.body.pop("template", None)
            if case.body.get("timeout_s") is not None:
                case.body["timeout_s"] = max(case.body["timeout_s"], IDLE_FLOOR_S)
        if operation == "runCommand" and positive and isinstance(case.body, dict):
            timeout = case.body.get("timeout_s")
            case.body["timeout_s"] = min(timeout, EXEC_TIMEOUT_CAP_S) if timeout else EXEC_TIMEOUT_CAP_S
        if operation in ("watchDir", "getCommand", "readCommandOutput") and positive and case.query:
            for name in ("timeout_s", "wait_s"):  # a stream or a wait as long as the schema allows: seconds here
                if isinstance(case.query.get(name), int | float):
                    case.query[name] = min(case.query[name], 2)
        if operation == "exec" and positive and isinstance(case.body, dict):
            timeout = case.body.get("timeout_s")
            case.body["timeout_s"] = min(timeout, EXEC_TIMEOUT_CAP_S) if timeout else EXEC_TIMEOUT_CAP_S
        if operation in ON_TARGET and positive and sum(self.calls.values()) % 2:
            case.path_parameters = {**(case.path_parameters or {}), "sandbox_id": self.target}

    def call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
        """Headers that win over the configured tenant key: the metrics key on a schema-valid GET /metrics."""
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        if positive and case.operation.definition.raw.get("operationId") == "metrics":
            return {"headers": self.live.headers(self.live.metrics_key)}
        return {}

    def record(self, case: schemathesis.Case, response: Any) -> None:
        self.calls[case.operation.label] += 1
        self.statuses[response.status_code] += 1

    def clean_up(self, case: schemathesis.Case, response: Any) -> None:
        """Close what a stateless call created, so the per-key limit is not what the next call meets."""
        if response.status_code != 201:
            return
        body = response.json()
        for sandbox in body.get("sandboxes", [body]):
            self._own.delete(f"/v1/sandboxes/{sandbox['id']}")

    # ---- checks of our own, beside Schemathesis's -----------------------------------------------------------------

    def error_shape(self, ctx, response, case) -> None:
        problem = error_shape_problem(response)
        assert problem is None, f"not the JSON error shape: {problem}"

    def schema_valid_is_not_invalid(self, ctx, response, case) -> None:
        if response.status_code != 422 or case.meta is None or not case.meta.generation.mode.is_positive:
            return
        error = response.json()["error"]
        if error["code"] in RUNTIME_422:
            return
        if error.get("field") == "network":
            return  # a policy is checked against this host's resolver and address rules, which no schema states
        if case.operation.definition.raw.get("operationId") in FILE_OPERATIONS:
            return  # "0: Not a directory": what the path is inside the sandbox, which no schema states either
        raise AssertionError(f"a request the schema allows was refused as invalid: {error}")

    def other_key_sees_nothing(self, ctx, response, case) -> None:
        """A sandbox one key reads is a 404 for the other key, exactly as one that never existed."""
        if case.method != "GET" or not 200 <= response.status_code < 300:
            return
        sandbox_id = (case.path_parameters or {}).get("sandbox_id")
        if not sandbox_id:
            return
        peer = self._other.get(case.formatted_path, params=case.query)
        assert peer.status_code == 404, f"key B got {peer.status_code} for key A's {case.formatted_path}"

    @property
    def checks(self) -> list:
        return [self.error_shape, self.schema_valid_is_not_invalid, self.other_key_sees_nothing]

    def close(self) -> None:
        self._own.close()
        self._other.close()


def _config(live: LiveService, examples: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {live.key}"},
        "request-timeout": 120,
        "cache": {"enabled": False},
        "generation": {"max-examples": examples, "database": "none"},
        "checks": {
            # 422 too: the check above decides which 422s a valid request may get
            "positive_data_acceptance": {"expected-statuses": ["2xx", 404, 409, 410, 422, 429, 503, 507]},
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 409, 413, 422]},
        },
    })


@pytest.fixture(scope="module")
def fuzz_run(live):
    with live.client() as api:
        target = api.post("/v1/sandboxes", json={"metadata": {"fuzz": "target"}})
        assert target.status_code == 201, target.text
    run = FuzzRun(live, target.json()["id"])
    yield run
    run.close()
    delete_all(live)
    print(f"\nfuzz: {sum(run.calls.values())} cases, statuses {dict(sorted(run.statuses.items()))}")


@pytest.fixture(scope="module")
def api_schema(live, fuzz_run):
    return schemathesis.openapi.from_url(f"{live.url}/v1/openapi.json", config=_config(live, EXAMPLES))


def test_every_route_answers_by_its_contract(api_schema, fuzz_run):
    """Examples, boundary values (coverage) and generated cases, valid and invalid, for every operation.

    Schemathesis's own per-operation tests, run here rather than through `schemathesis.pytest.from_fixture`, whose
    subtest reporting needs an attribute pytest 9.2 no longer has; every operation runs, and all failures are listed."""

    def one_case(case):
        fuzz_run.prepare(case)
        response = case.call(**fuzz_run.call_kwargs(case))
        fuzz_run.record(case, response)
        try:
            case.validate_response(response, additional_checks=fuzz_run.checks)
        finally:
            fuzz_run.clean_up(case, response)

    failures, tested = {}, set()
    for result in get_all_tests(schema=api_schema, test_func=one_case, settings=settings(**SETTINGS), given_kwargs={}):
        if not isinstance(result, Ok):
            failures[str(result.err())] = result.err()
            continue
        operation, run_operation = result.ok()
        tested.add(operation.label)
        try:
            run_operation()
        except Exception as exc:  # every operation runs; the failures are listed together below
            failures[operation.label] = exc
    documented = {f"{method.upper()} {path}" for path, item in api_schema.raw_schema["paths"].items()
                  for method in item if method in ("get", "put", "post", "delete")}
    documented.discard("GET /v1/openapi.json")  # Schemathesis leaves out the document it was loaded from
    assert tested == documented, f"not tested: {documented - tested}"
    assert not failures, "\n\n".join(f"{label}:\n{exc}" for label, exc in failures.items())


def test_linked_sequences_keep_the_contract(api_schema, fuzz_run, live):
    """create -> exec -> fork -> freeze -> resume -> delete (and the rest of the links), in generated orders."""
    run = fuzz_run

    class Workflow(api_schema.as_state_machine()):
        def before_call(self, case):
            run.prepare(case)

        def get_call_kwargs(self, case):
            return run.call_kwargs(case)

        def after_call(self, response, case):
            super().after_call(response, case)
            run.record(case, response)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            # as the parent does (its own signature has no way to leave a check out)
            inner = case.operation.definition.raw.get("operationId") in INNER_404
            case.validate_response(response, additional_checks=run.checks, transport_kwargs=kwargs or None,
                                   excluded_checks=[ensure_resource_availability] if inner else None,
                                   recorder=self.recorder)

        def teardown(self):
            delete_all(live, keep=frozenset({run.target}))

    Workflow.run(settings=settings(max_examples=SCENARIOS, stateful_step_count=6, **SETTINGS))
    linked = {label for label in run.calls if label.startswith(("POST /v1/sandboxes/{sandbox_id}/",))}
    assert linked, "the stateful phase followed no link"


def test_enough_cases_ran_and_none_failed_the_service(fuzz_run):
    """Runs last in this module: the total the two tests above sent."""
    total = sum(fuzz_run.calls.values())
    assert total >= MIN_CASES, f"only {total} generated cases ran (want {MIN_CASES}): raise APPLIANCE_FUZZ_EXAMPLES"
    assert not [status for status in fuzz_run.statuses if status >= 500]
