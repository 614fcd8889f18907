"""The messages between the agent and its worker (internal; the host never sees them).

Requests, agent -> worker: an exec is a header line and the code's bytes (no JSON on the per-exec path:
encoding and parsing it cost a tenth of a millisecond each way under TCG):
    b"exec <n>\\n" followed by n bytes of code (UTF-8, lone surrogates passed through)
every other request is one JSON object per line:
    {"op": "reseed", "seed_hex": str}   {"op": "ack", "seq": int}
Control, worker -> agent, one JSON object per line:
    {"ev": "ready", "pid": int}   {"ev": "display", "data": bundle, "seq": int | null}
    {"ev": "done", "value": bundle | null, "error": {name, value, traceback} | null}
"""

from __future__ import annotations

# The done message of most execs (a statement, no error), byte for byte: the worker writes it without the
# JSON encoder and the agent recognises it without the parser. Under TCG every step on this path counts.
DONE_QUIET = b'{"ev":"done","value":null,"error":null}\n'
EXEC_HEADER = b"exec "
CODE_ERRORS = "surrogatepass"  # JSON may carry a lone surrogate ("\ud800"): it must survive the pipe


def exec_request(code: str) -> bytes:
    data = code.encode("utf-8", CODE_ERRORS)
    return b"%s%d\n%s" % (EXEC_HEADER, len(data), data)
