"""The execution API's WSGI app: `create_app(config, manager)`; everything it uses is passed in.

Routes (all JSON unless noted; every one but the probes and the API description needs a Bearer key):
    POST   /v1/sandboxes                               create
    GET    /v1/sandboxes[?state=S]                     list the caller's (S: running, frozen, lost)
    GET    /v1/sandboxes/{sandbox_id}                  show
    DELETE /v1/sandboxes/{sandbox_id}                  close
    POST   /v1/sandboxes/{sandbox_id}/exec             run code (JSON; NDJSON events if Accept: application/x-ndjson)
    POST   /v1/sandboxes/{sandbox_id}/interrupt        KeyboardInterrupt in the running code
    POST   /v1/sandboxes/{sandbox_id}/fork             n copies of its live state ({n}; 201 {sandboxes})
    POST   /v1/sandboxes/{sandbox_id}/freeze           write its state to disk and stop its VM
    POST   /v1/sandboxes/{sandbox_id}/resume           restore a frozen one (an exec does this by itself)
    PUT    /v1/sandboxes/{sandbox_id}/files?path=P     upload (streamed body)
    GET    /v1/sandboxes/{sandbox_id}/files?path=P     download (streamed, with Content-Length)
    GET    /v1/sandboxes/{sandbox_id}/files/list?path=D  list a directory (depth=N: recursive)
    DELETE /v1/sandboxes/{sandbox_id}/files?path=P     remove (recursive=true for a non-empty directory)
    GET    /v1/sandboxes/{sandbox_id}/files/stat?path=P  stat (a link as a link)
    POST   /v1/sandboxes/{sandbox_id}/files/mkdir      {path, parents}
    POST   /v1/sandboxes/{sandbox_id}/files/rename     {path, to, overwrite}
    GET    /v1/sandboxes/{sandbox_id}/files/watch?path=D  NDJSON create/modify/delete events (recursive, timeout_s)
    POST   /v1/sandboxes/{sandbox_id}/snapshots        save its live state under a name ({name}; 201 snapshot)
    GET    /v1/snapshots                               list the caller's named snapshots
    GET    /v1/snapshots/{name}                        show one
    DELETE /v1/snapshots/{name}                        delete one (POST /v1/sandboxes {"snapshot": name} uses it)
    POST   /v1/sandboxes/{sandbox_id}/commands           run a command beside the REPL (background: a handle);
    GET    .../commands, .../commands/{cid}[?wait_s], .../commands/{cid}/output?offset=N, POST .../stdin, .../signal
    GET    /v1/healthz   GET /v1/readyz   GET /metrics (metrics key)   GET /v1/openapi.json   GET /v1/docs
    /e2b/...                                           the E2B-compatible front door (service/compat/e2b)
"""

from __future__ import annotations

import falcon

from service.commands import Commands
from service.compat import e2b
from service.engine.deployment_secret import read_or_create
from service.keys import KeyRing
from service.settings import ServiceConfig, key_ring

from . import error_responses
from .commands import CommandCollection, CommandItem, CommandOutput, CommandSignal, CommandStdin
from .docs import Docs
from .exec import Exec, Interrupt
from .file_ops import FileStat, MakeDir, Rename, Watch
from .files import FileList, Files
from .health import Healthz, Readyz
from .lifecycle import Fork, StateChange
from .metrics import Metrics, MetricsMiddleware, MetricsResource
from .middleware import Auth, BodyLimit, RequestContext
from .openapi import OpenApi
from .sandboxes import SandboxCollection, SandboxItem
from .snapshots import SandboxSnapshots, SnapshotCollection, SnapshotItem


def create_app(config: ServiceConfig, manager, metrics: Metrics | None = None,
               keys: KeyRing | None = None) -> falcon.App:
    """`manager` is a service.manager.SandboxManager (or anything with its methods, in tests); `keys` defaults to
    the config's key ring (configured keys and the key store)."""
    metrics = metrics or Metrics(manager.registry.counts_by_state)
    keys = keys or key_ring(config)
    app = falcon.App(
        middleware=[
            RequestContext(), MetricsMiddleware(metrics), Auth(keys, own_auth_prefixes=(f"{e2b.PREFIX}/",)),
            BodyLimit(config.max_body_bytes),
        ],
    )
    app.req_options.auto_parse_qs_csv = False
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.secure_cookies_by_default = False
    error_responses.install(app)

    sandbox = "/v1/sandboxes/{sandbox_id}"
    app.add_route("/v1/sandboxes", SandboxCollection(manager, config.max_body_bytes, metrics))
    app.add_route(sandbox, SandboxItem(manager))
    app.add_route(f"{sandbox}/exec", Exec(manager, config.max_body_bytes, config.max_code_bytes, metrics))
    app.add_route(f"{sandbox}/interrupt", Interrupt(manager))
    app.add_route(f"{sandbox}/fork", Fork(manager, config.max_body_bytes, config.max_fork, metrics))
    for action in ("freeze", "resume"):
        app.add_route(f"{sandbox}/{action}", StateChange(manager, metrics, action))
    app.add_route(f"{sandbox}/files", Files(manager, config.max_file_bytes))
    app.add_route(f"{sandbox}/files/list", FileList(manager))
    app.add_route(f"{sandbox}/files/stat", FileStat(manager))
    app.add_route(f"{sandbox}/files/mkdir", MakeDir(manager))
    app.add_route(f"{sandbox}/files/rename", Rename(manager))
    app.add_route(f"{sandbox}/files/watch", Watch(manager))
    commands = Commands(manager)
    app.add_route(f"{sandbox}/commands", CommandCollection(commands, config.max_body_bytes))
    app.add_route(f"{sandbox}/commands/{{command_id}}", CommandItem(commands))
    app.add_route(f"{sandbox}/commands/{{command_id}}/output", CommandOutput(commands))
    app.add_route(f"{sandbox}/commands/{{command_id}}/stdin", CommandStdin(commands, config.max_body_bytes))
    app.add_route(f"{sandbox}/commands/{{command_id}}/signal", CommandSignal(commands, config.max_body_bytes))
    app.add_route("/v1/healthz", Healthz())
    app.add_route("/v1/readyz", Readyz(manager))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/v1/openapi.json", OpenApi(config.max_fork))
    app.add_route("/v1/docs", Docs(config.max_fork))
    app.add_route(f"{sandbox}/snapshots", SandboxSnapshots(manager, config.max_body_bytes, metrics))
    app.add_route("/v1/snapshots", SnapshotCollection(manager))
    app.add_route("/v1/snapshots/{name}", SnapshotItem(manager))
    e2b.install(app, manager, keys, read_or_create(config.secret_file), config.max_body_bytes, config.max_code_bytes)
    return app
