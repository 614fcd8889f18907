"""The service's own routes: metrics, the docs page, the OpenAPI description, and connection hygiene."""
from __future__ import annotations

import falcon
import falcon.inspect
import falcon.testing
import openapi_spec_validator

from service.api.openapi import openapi_document

from .api_helpers import A, M
from .fakes import BUSY_CODE


def test_metrics(client, sandbox_id):
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "1"}, headers=A)
    client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": BUSY_CODE}, headers=A)
    text = client.simulate_get("/metrics", headers=M).text
    assert 'appliance_sandboxes{state="running"} 1.0' in text
    assert "appliance_creates_total 1.0" in text
    assert 'appliance_exec_seconds_count{language="python",mode="json"} 1.0' in text
    assert 'appliance_errors_total{code="sandbox_busy"} 1.0' in text


def test_docs_page_is_self_contained_and_lists_every_operation(client):
    result = client.simulate_get("/v1/docs")
    assert result.headers["content-type"].startswith("text/html")
    page = result.text
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for path, item in openapi_document()["paths"].items():
        assert path in page
        for method in ("get", "post", "put", "delete"):
            if method in item:
                assert item[method]["summary"] in page.replace("&#x27;", "'")


def _router_operations(app: falcon.App) -> set[tuple[str, str]]:
    """The app's own routes; the E2B-compatible ones (/e2b/...) follow E2B's description, listed in docs/e2b.md."""
    return {
        (route.path, method.method.lower())
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal and not route.path.startswith("/e2b/")
    }


def test_openapi_describes_exactly_the_routes_the_app_has(app, client):
    served = client.simulate_get("/v1/openapi.json").json
    assert served["openapi"].startswith("3.1")
    documented = {
        (path, method)
        for path, item in served["paths"].items()
        for method in item
        if method in {"get", "post", "put", "delete", "patch"}
    }
    routes = _router_operations(app)
    assert len(routes) == 26 + 6  # + 6: the commands routes (issue 15)
    assert documented == routes


def test_openapi_refs_resolve_and_operations_are_complete(client):
    doc = client.simulate_get("/v1/openapi.json").json
    openapi_spec_validator.validate(doc)  # the OpenAPI 3.1 schema itself

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                target = doc
                for part in node["$ref"].lstrip("#/").split("/"):
                    assert part in target, node["$ref"]
                    target = target[part]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["summary"] and op["responses"] and op["operationId"], (path, method)
            if "{sandbox_id}" in path:
                assert "404" in op["responses"] and "401" in op["responses"]


def test_a_refused_body_is_read_off_the_connection(app, sandbox_id):
    # gunicorn drains only 64 KiB of an unread body, then drops a connection it promised to keep alive
    env = falcon.testing.create_environ(
        method="POST",
        path=f"/v1/sandboxes/{sandbox_id}/exec",
        body=b"x" * (200 << 10),
        headers=A,
    )
    statuses: list[str] = []
    b"".join(app(env, lambda status, headers: statuses.append(status)))
    assert statuses[0].startswith("413")
    assert env["wsgi.input"].read() == b""
