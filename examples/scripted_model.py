#!/usr/bin/env python3
"""A scripted stand-in for an OpenAI-compatible chat endpoint, for demos and tests without a model.

    python examples/scripted_model.py [--port 8765]     # then OPENAI_BASE_URL=http://127.0.0.1:8765/v1

It answers the first request with one run_python tool call (a small pandas computation) and the next one, which
carries the tool's result, with a sentence quoting that result. The sandbox side stays real.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

SCRIPTED_CODE = "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nint(df.a.sum())"


class ScriptedModel(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []  # every request body, for tests to inspect

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).requests.append(body)
        tool_results = [m for m in body.get("messages", []) if m.get("role") == "tool"]
        if not tool_results:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "run_python", "arguments": json.dumps({"code": SCRIPTED_CODE})}}]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": f"The tool said: {tool_results[-1]['content']!r}"}
            finish = "stop"
        payload = json.dumps({"id": "scripted", "object": "chat.completion", "model": body.get("model", ""),
                              "choices": [{"index": 0, "message": message, "finish_reason": finish}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def start(port: int = 0) -> ThreadingHTTPServer:
    """Serve on 127.0.0.1 in a background thread; server.server_port is the port, server.shutdown() stops it."""
    server = ThreadingHTTPServer(("127.0.0.1", port), ScriptedModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), ScriptedModel)
    print(f"scripted model on http://127.0.0.1:{server.server_port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
