"""Which warm template new sandboxes are cloned from. The pool keeper publishes it; API workers read it."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from service.engine.template import Template, TemplateError

from .registry import Registry

log = logging.getLogger(__name__)
CURRENT = "current.json"


class TemplateStore:
    def __init__(self, templates_dir: Path) -> None:
        self.directory = templates_dir
        self._cached: tuple[float, Template | None] | None = None

    def current(self) -> Template | None:
        """The published template, or None while none is warm. Re-read only when the pointer changed."""
        pointer = self.directory / CURRENT
        try:
            mtime = pointer.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if self._cached is not None and self._cached[0] == mtime:
            return self._cached[1]
        try:
            template_id = json.loads(pointer.read_text())["id"]
            template = Template.load(self.directory / template_id)
        except (OSError, ValueError, KeyError, TemplateError) as exc:
            log.warning("published template unusable: %s", exc)
            template = None
        self._cached = (mtime, template)
        return template

    def publish(self, template: Template) -> None:
        pointer = self.directory / CURRENT
        tmp = pointer.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"id": template.template_id}))
        tmp.replace(pointer)

    def remove_unused(self, registry: Registry) -> list[str]:
        """Delete templates that are neither published nor mapped by any sandbox (pooled, running or frozen)."""
        current = self.current()
        in_use = {record.template_id for record in registry.list()}
        removed = []
        for directory in sorted(self.directory.glob("tpl-*")):
            if (current is None or directory.name != current.template_id) and directory.name not in in_use:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory.name)
        return removed
