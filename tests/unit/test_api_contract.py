"""What fuzzing the API from its own OpenAPI document found (tests/reliability/test_fuzz.py), each kept fixed here:
the document and the validators agree on what a request may be, and the document states this service's limits."""

from __future__ import annotations

import pytest

from service.snapshot_names import NAME_PATTERN

from .api_helpers import A, assert_error, fork

MAX_FORK = 2


@pytest.fixture
def service_overrides() -> dict:
    return {"max_fork": MAX_FORK, "max_sandboxes_per_key": 8}


def test_a_whole_number_written_as_a_float_is_an_integer(client, sandbox_id):
    # JSON Schema's "integer" takes 1.0; the validators refused it (strict int) while the document allowed it.
    assert fork(client, sandbox_id, {"n": 1.0}).status_code == 201
    made = client.simulate_post("/v1/sandboxes", json={"vcpus": 1.0, "timeout_s": 60}, headers=A)
    assert made.status_code == 201, made.text


@pytest.mark.parametrize("value", ["1", True])
def test_strings_and_booleans_are_not_numbers(client, sandbox_id, value):
    # ...and the lax validators took "1" and true where the document says integer or number.
    assert assert_error(fork(client, sandbox_id, {"n": value}), 422, "invalid")["field"] == "n"
    for field in ("vcpus", "memory_mib", "timeout_s"):
        made = client.simulate_post("/v1/sandboxes", json={field: value}, headers=A)
        assert assert_error(made, 422, "invalid")["field"] == field
    ran = client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1", "timeout_s": value}, headers=A)
    assert assert_error(ran, 422, "invalid")["field"] == "timeout_s"


def test_the_document_states_this_services_fork_limit_and_it_holds(client, sandbox_id):
    n = client.simulate_get("/v1/openapi.json").json["components"]["schemas"]["ForkRequest"]["properties"]["n"]
    assert n["maximum"] == MAX_FORK
    assert fork(client, sandbox_id, {"n": MAX_FORK}).status_code == 201
    assert assert_error(fork(client, sandbox_id, {"n": MAX_FORK + 1}), 422, "invalid")["field"] == "n"


def test_file_paths_are_non_empty_and_without_nul_as_the_document_says(client, sandbox_id):
    document = client.simulate_get("/v1/openapi.json").json["paths"]
    for route, method, min_length in (("/v1/sandboxes/{sandbox_id}/files", "get", 1),
                                      ("/v1/sandboxes/{sandbox_id}/files", "put", 1),
                                      ("/v1/sandboxes/{sandbox_id}/files/list", "get", None)):  # empty: "/"
        (path,) = [p for p in document[route][method]["parameters"] if p["name"] == "path"]
        assert "x00" in path["schema"]["pattern"] and path["schema"].get("minLength") == min_length
    files = f"/v1/sandboxes/{sandbox_id}/files"
    assert_error(client.simulate_get(files, query_string="path=", headers=A), 422, "invalid")
    # the listing passed a NUL byte on to the sandbox (the file routes refused it already)
    assert_error(client.simulate_get(f"{files}/list", query_string="path=/tmp%00x", headers=A), 422, "invalid")
    assert client.simulate_get(f"{files}/list", query_string="path=", headers=A).status_code == 200  # "/"


def test_refusals_that_say_when_to_retry_promise_retry_after(client):
    responses = client.simulate_get("/v1/openapi.json").json["components"]["responses"]
    for status in ("E429", "E503"):
        assert responses[status]["headers"]["Retry-After"]["required"] is True


def test_create_fork_freeze_and_resume_link_to_what_can_follow(client):
    paths = client.simulate_get("/v1/openapi.json").json["paths"]
    created = paths["/v1/sandboxes"]["post"]["responses"]["201"]
    assert created["headers"]["Location"]["required"] is True
    follow = {link["operationId"] for link in created["links"].values()}
    assert {"exec", "forkSandbox", "freezeSandbox", "resumeSandbox", "deleteSandbox"} <= follow
    forked = paths["/v1/sandboxes/{sandbox_id}/fork"]["post"]["responses"]["201"]["links"]
    assert {link["parameters"]["sandbox_id"] for link in forked.values()} == {"$response.body#/sandboxes/0/id"}
    for action, then in (("freeze", "resumeSandbox"), ("resume", "freezeSandbox")):
        links = paths[f"/v1/sandboxes/{{sandbox_id}}/{action}"]["post"]["responses"]["200"]["links"]
        assert then in {link["operationId"] for link in links.values()}


def test_a_policy_the_host_refuses_names_the_network_field(client, engine, monkeypatch):
    # The host's check (a name its resolver does not know) answered 422 without error.field; docs/api.md promises it.
    from service.engine.netpolicy import PolicyError

    def refuse(requested, settings):
        raise PolicyError("network.egress.allow: cannot resolve 'db.internal' on the host")

    monkeypatch.setattr(engine, "network_request", refuse)
    made = client.simulate_post("/v1/sandboxes", json={"network": {"egress": {"allow": ["db.internal:5432"]}}},
                                headers=A)
    assert assert_error(made, 422, "invalid")["field"] == "network"


def test_the_document_names_the_templates_a_create_takes(client):
    # Templates are named (published by an operator, or "default"); the document gives the names' pattern, and a
    # name it allows that names no template is a 404, not a 422.
    properties = client.simulate_get("/v1/openapi.json").json["components"]["schemas"]["CreateSandbox"]["properties"]
    for field in ("template", "snapshot"):
        (named,) = [choice for choice in properties[field]["anyOf"] if choice.get("type") == "string"]
        assert named["pattern"] == NAME_PATTERN and named["maxLength"] == 64
        made = client.simulate_post("/v1/sandboxes", json={field: ""}, headers=A)
        assert assert_error(made, 422, "invalid")["field"] == field
        assert_error(client.simulate_post("/v1/sandboxes", json={field: "nothing-of-that-name"}, headers=A), 404,
                     "not_found")
    assert client.simulate_post("/v1/sandboxes", json={"template": "default"}, headers=A).status_code == 201


def test_the_snapshot_routes_document_every_status_they_answer(client, sandbox_id):
    paths = client.simulate_get("/v1/openapi.json").json["paths"]
    documented = {(route, method): set(operation["responses"])
                  for route in ("/v1/sandboxes/{sandbox_id}/snapshots", "/v1/snapshots", "/v1/snapshots/{name}")
                  for method, operation in paths[route].items() if method in {"get", "post", "delete"}}
    answers = {
        ("/v1/sandboxes/{sandbox_id}/snapshots", "post"): [
            client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "s"}, headers=A),  # 201
            client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "s"}, headers=A),  # 409
            client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "../s"}, headers=A),  # 422
            client.simulate_post("/v1/sandboxes/sb-0/snapshots", json={"name": "t"}, headers=A),  # 404
            client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "t"}),  # 401
            client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", body=b"{", headers=A),  # 400
        ],
        ("/v1/snapshots", "get"): [client.simulate_get("/v1/snapshots", headers=A),
                                   client.simulate_get("/v1/snapshots")],
        ("/v1/snapshots/{name}", "get"): [client.simulate_get("/v1/snapshots/s", headers=A),
                                          client.simulate_get("/v1/snapshots/nope", headers=A),
                                          client.simulate_get("/v1/snapshots/.x", headers=A)],
        ("/v1/snapshots/{name}", "delete"): [client.simulate_delete("/v1/snapshots/nope", headers=A),
                                             client.simulate_delete("/v1/snapshots/.x", headers=A),
                                             client.simulate_delete("/v1/snapshots/s", headers=A)],
    }
    for operation, results in answers.items():
        assert {str(result.status_code) for result in results} <= documented[operation], operation
    assert {"429", "507", "500"} <= documented[("/v1/sandboxes/{sandbox_id}/snapshots", "post")]
    assert {"404", "500"} <= set(paths["/v1/sandboxes"]["post"]["responses"])  # a create from a snapshot
