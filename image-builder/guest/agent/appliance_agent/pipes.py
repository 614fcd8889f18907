"""The messages between the agent and its worker (internal; the host never sees them).

Requests, agent -> worker, one JSON object per line:
    {"op": "exec", "code": str}   {"op": "reseed", "seed_hex": str}   {"op": "ack", "seq": int}
Control, worker -> agent, one JSON object per line:
    {"ev": "ready", "pid": int}   {"ev": "display", "data": bundle, "seq": int | null}
    {"ev": "done", "value": bundle | null, "error": {name, value, traceback} | null}
"""

from __future__ import annotations

# The done message of most execs (a statement, no error), byte for byte: the worker writes it without the
# JSON encoder and the agent recognises it without the parser. Under TCG every step on this path counts.
DONE_QUIET = b'{"ev":"done","value":null,"error":null}\n'
