"""What a fleet's balancer needs from a node: sandbox ids that name their node, and the node's free capacity as an
HAProxy agent-check reply. Pure: the caller brings the node's tag and the numbers.

Ids: `sb-<16 hex>` on a node without a tag (every id made before tags existed stays valid), `sb-<tag>-<16 hex>` on a
node with `service.node_tag`. The balancer (roles/balancer) reads the tag from the path and sends the request to
that node; fork copies and resumed sandboxes get ids from the node that holds their memory, so they carry its tag.

Agent-check (HAProxy's `agent-check`): the node answers one line on a TCP port. `ready up <N>%` sets the server's
weight to N % of its configured weight, so creates go where there is most room (`ready` ends a drain: HAProxy keeps a
server draining until told so); `drain` stops new creates (while the node is being upgraded, or is full) and leaves
the sandboxes already there reachable by their ids.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

NODE_TAG_PATTERN = r"[a-z0-9]{1,12}"
SANDBOX_ID = re.compile(rf"sb-(?:(?P<tag>{NODE_TAG_PATTERN})-)?[0-9a-f]{{16}}")
# The path parameter's pattern in the API description (service/api/openapi.py).
SANDBOX_ID_PATTERN = rf"^sb-(?:{NODE_TAG_PATTERN}-)?[0-9a-f]+$"


def new_sandbox_id(node_tag: str = "") -> str:
    if node_tag and not re.fullmatch(NODE_TAG_PATTERN, node_tag):
        raise ValueError(f"node tag {node_tag!r}: 1-12 lowercase letters and digits")
    return f"sb-{node_tag}-{secrets.token_hex(8)}" if node_tag else f"sb-{secrets.token_hex(8)}"


def node_tag_of(sandbox_id: str) -> str | None:
    """The tag of the node an id was made on; None for an untagged (old or single-node) id or a malformed one."""
    match = SANDBOX_ID.fullmatch(sandbox_id)
    return match["tag"] if match else None


@dataclass(frozen=True)
class Capacity:
    """A node's room for new sandboxes: slots (service.max_sandboxes less those running or pooled) and committable
    guest memory (memory_overcommit × (host memory − reserve) less what is committed); None: unknown (no limit)."""

    slots_free: int
    slots_total: int
    memory_free_mib: float | None = None
    memory_total_mib: float | None = None


def agent_reply(capacity: Capacity, draining: bool) -> str:
    """The agent-check line for this capacity: `drain` when draining or full, else `ready up N%` with N the smaller of
    the free fractions of slots and memory (at least 1, so a node with room always gets some creates)."""
    if draining or capacity.slots_free <= 0:
        return "drain\n"
    fractions = [capacity.slots_free / capacity.slots_total] if capacity.slots_total > 0 else []
    if capacity.memory_free_mib is not None and capacity.memory_total_mib:
        if capacity.memory_free_mib <= 0:
            return "drain\n"
        fractions.append(capacity.memory_free_mib / capacity.memory_total_mib)
    percent = max(1, min(100, round(100 * min(fractions)))) if fractions else 100
    return f"ready up {percent}%\n"
