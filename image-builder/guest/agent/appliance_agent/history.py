"""In, Out, _, __, ___, _i, _ii, _iii, _iN, _N in the user's namespace, kept as IPython's displayhook and
history manager keep them (IPython 9: core/displayhook.py update_user_ns, core/history.py store_inputs)."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# IPython's default output cache size; past it the oldest outputs are dropped (they hold memory alive).
CACHE_SIZE = 1000
CULL = 200


class History:
    def __init__(self, namespace: dict[str, Any]) -> None:
        self._ns = namespace
        self.inputs: list[str] = [""]
        self.outputs: dict[int, Any] = {}
        self._ = self.__ = self.___ = ""
        self._i = self._ii = self._iii = self._i00 = ""
        namespace.update({
            "In": self.inputs, "_ih": self.inputs, "Out": self.outputs, "_oh": self.outputs,
            "_dh": [os.getcwd()], "_": "", "__": "", "___": "", "_i": "", "_ii": "", "_iii": "",
        })

    def store_input(self, number: int, raw: str, parsed: str) -> None:
        """Before cell `number` runs: In gets the transformed cell, _i.. the raw ones, both without trailing
        newlines (IPython does the same)."""
        # On the per-exec path: plain assignments, no dict built per cell.
        if raw[-1:] == "\n":
            raw = raw.rstrip("\n")
        if parsed[-1:] == "\n":
            parsed = parsed.rstrip("\n")
        self.inputs.append(parsed)
        ns = self._ns
        ns["_iii"] = self._iii = self._ii
        ns["_ii"] = self._ii = self._i
        ns["_i"] = self._i = self._i00
        self._i00 = ns["_i" + str(number)] = raw

    def store_output(self, number: int, value: Any) -> None:
        """After cell `number` gave a value: Out[number], _number, and _, __, ___ moved on, unless the user
        assigned one of those names himself (IPython leaves them alone then)."""
        if value is self.outputs:
            return
        if len(self.outputs) >= CACHE_SIZE:
            for key in sorted(self.outputs)[:CULL]:
                del self.outputs[key]
                self._ns.pop(f"_{key}", None)
        ns = self._ns
        update_unders = all(
            name not in ns or ns[name] is current for name, current in (("_", self._), ("__", self.__),
                                                                         ("___", self.___))
        )
        self.___, self.__, self._ = self.__, self._, value
        if update_unders:
            ns.update({"_": self._, "__": self.__, "___": self.___})
        ns[f"_{number}"] = value
        self.outputs[number] = value
