"""Ansible callback: write what happened, one JSON object a line, for `appliance deploy` to summarize.

Enabled by `appliance deploy` (ANSIBLE_CALLBACKS_ENABLED=appliance_events) with the file in APPLIANCE_EVENTS_FILE.
Only what a summary needs is written: task names and times, and for failures the message and the tail of the
module's error output (never a whole result, which could hold secrets; no_log results arrive censored anyway).
"""

from __future__ import annotations

import json
import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: appliance_events
type: notification
short_description: write task timings and failures as JSON lines for appliance deploy
description:
  - Writes one JSON object a line to the file named by APPLIANCE_EVENTS_FILE.
requirements:
  - enabled in callbacks_enabled
"""

_TAIL = 2000  # characters of error output kept per failure


def _tail(text: object) -> str:
    return str(text)[-_TAIL:] if text else ""


def _failure_fields(result: dict) -> dict:
    fields = {key: _tail(result.get(key)) for key in ("msg", "module_stderr", "module_stdout", "stderr")
              if result.get(key)}
    if "rc" in result:
        fields["rc"] = result["rc"]
    items = [item for item in result.get("results", []) if isinstance(item, dict) and item.get("failed")]
    if items:
        fields["item"] = _failure_fields(items[0])
        label = items[0].get("_ansible_item_label", items[0].get("item"))
        if isinstance(label, str | int | float):
            fields["item"]["label"] = str(label)
    return fields


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "notification"
    CALLBACK_NAME = "appliance_events"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        path = os.environ.get("APPLIANCE_EVENTS_FILE")
        self._out = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (lives as long as the run)

    def _emit(self, event: str, **fields: object) -> None:
        if self._out is not None:
            self._out.write(json.dumps({"event": event, "time": time.time(), **fields}, default=str) + "\n")

    def _task(self, result) -> dict:
        task = result._task
        role = getattr(task, "_role", None)
        return {"host": result._host.get_name(), "task": task.get_name(), "role": role.get_name() if role else None}

    def v2_playbook_on_play_start(self, play) -> None:
        self._emit("play", name=play.get_name())

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._emit("task", name=task.get_name())

    def v2_playbook_on_handler_task_start(self, task) -> None:
        self._emit("task", name=task.get_name(), handler=True)

    def v2_runner_on_failed(self, result, ignore_errors: bool = False) -> None:
        self._emit("failed", ignored=ignore_errors, **self._task(result), **_failure_fields(result._result))

    def v2_runner_on_unreachable(self, result) -> None:
        self._emit("unreachable", **self._task(result), **_failure_fields(result._result))

    def v2_runner_on_ok(self, result) -> None:
        if result._result.get("changed"):
            self._emit("changed", **self._task(result))

    def v2_playbook_on_stats(self, stats) -> None:
        hosts = sorted(stats.processed)
        self._emit("stats", hosts={host: stats.summarize(host) for host in hosts})
        if self._out is not None:
            self._out.close()
            self._out = None
