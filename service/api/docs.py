"""/v1/docs: the OpenAPI document as one self-contained HTML page (inline CSS, no scripts, no CDN): it must
read the same on an air-gapped host."""

from __future__ import annotations

import json
from html import escape
from typing import Any

import falcon

from .openapi import DEFAULT_MAX_FORK, openapi_document

_METHODS = ("get", "post", "put", "delete", "patch")
_CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#1d232a}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #dde} code,pre{font:13px ui-monospace,monospace}
pre{background:#f5f6f8;padding:.7em;overflow-x:auto;border-radius:4px}
.op{border:1px solid #dde;border-radius:6px;margin:1em 0;padding:.6em 1em}
.m{display:inline-block;min-width:4.5em;text-align:center;border-radius:3px;color:#fff;font-weight:600;
padding:0 .4em;margin-right:.5em;text-transform:uppercase;font-size:12px}
.get{background:#2b7bb9}.post{background:#2f9e44}.put{background:#c27c0e}.delete{background:#c92a2a}
table{border-collapse:collapse;width:100%;margin:.4em 0} td,th{border-bottom:1px solid #eee;text-align:left;
padding:.25em .5em;vertical-align:top} .pub{color:#2f9e44;font-size:12px;margin-left:.6em}
nav a{display:block;text-decoration:none} summary{cursor:pointer}
"""


def _resolve(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node and len(node) == 1:
        target: Any = doc
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def _schema_text(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
    return f"<code>{escape(json.dumps(schema))}</code>"


def _operation(doc: dict[str, Any], path: str, method: str, op: dict[str, Any], shared: list) -> str:
    anchor = f"{method}-{path}".replace("/", "-").replace("{", "").replace("}", "")
    public = '<span class="pub">no key needed</span>' if op.get("security") == [] else ""
    parts = [f'<div class="op" id="{escape(anchor)}"><h3><span class="m {method}">{method}</span>'
             f"<code>{escape(path)}</code>{public}</h3><p><b>{escape(op.get('summary', ''))}</b></p>"]
    if op.get("description"):
        parts.append(f"<p>{escape(op['description'])}</p>")
    params = [_resolve(doc, p) for p in shared + op.get("parameters", [])]
    if params:
        rows = "".join(
            f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
            f"<td>{'required' if p.get('required') else 'optional'}</td>"
            f"<td>{escape(p.get('description', ''))}</td></tr>"
            for p in params
        )
        parts.append(f"<table><tr><th>parameter</th><th>in</th><th></th><th></th></tr>{rows}</table>")
    body = op.get("requestBody")
    if body:
        kinds = ", ".join(f"{escape(kind)}: {_schema_text(media['schema'])}" for kind, media in body["content"].items())
        parts.append(f"<p>Request body ({'required' if body.get('required') else 'optional'}): {kinds}</p>")
    rows = []
    for status, response in op["responses"].items():
        response = _resolve(doc, response)
        content = ", ".join(
            f"{escape(kind)}: {_schema_text(media.get('schema', {}))}"
            for kind, media in response.get("content", {}).items()
        )
        rows.append(f"<tr><td><b>{escape(status)}</b></td><td>{escape(response['description'])}</td>"
                    f"<td>{content}</td></tr>")
    parts.append(f"<table><tr><th>status</th><th>meaning</th><th>body</th></tr>{''.join(rows)}</table></div>")
    return "".join(parts)


def render_docs(doc: dict[str, Any]) -> str:
    info = doc["info"]
    nav, ops = [], []
    for path, item in doc["paths"].items():
        shared = item.get("parameters", [])
        for method in _METHODS:
            if method in item:
                anchor = f"{method}-{path}".replace("/", "-").replace("{", "").replace("}", "")
                nav.append(f'<a href="#{escape(anchor)}"><span class="m {method}">{method}</span>'
                           f"<code>{escape(path)}</code></a>")
                ops.append(_operation(doc, path, method, item[method], shared))
    schemas = "".join(
        f'<details id="schema-{escape(name)}"><summary><code>{escape(name)}</code></summary>'
        f"<pre>{escape(json.dumps(schema, indent=2))}</pre></details>"
        for name, schema in doc["components"]["schemas"].items()
    )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(info['title'])}</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
        f"<h1>{escape(info['title'])}</h1><p>version {escape(info['version'])} · OpenAPI {escape(doc['openapi'])}"
        f" · <a href='/v1/openapi.json'>openapi.json</a></p><p>{escape(info['description'])}</p>"
        f"<h2>Routes</h2><nav>{''.join(nav)}</nav><h2>Operations</h2>{''.join(ops)}"
        f"<h2>Schemas</h2>{schemas}</body></html>"
    )


class Docs:
    def __init__(self, max_fork: int = DEFAULT_MAX_FORK) -> None:
        self._page = render_docs(openapi_document(max_fork))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = self._page
        resp.content_type = falcon.MEDIA_HTML
