"""Which warm template new sandboxes are cloned from. The pool keeper publishes it; API workers read it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from service.engine.template import Template, TemplateError

from .registry import Registry

log = logging.getLogger(__name__)
CURRENT = "current.json"
KEEPER_FAILURE = "keeper-failure.txt"  # why the pool keeper last failed to warm a template (cleared when one is)
_FAILURE_MAX_CHARS = 2000
_YOUNG_S = 300.0


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

    def record_failure(self, message: str) -> None:
        """Readiness then says why there is no template, instead of "still booting" while the keeper restarts."""
        target = self.directory / KEEPER_FAILURE
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(message[:_FAILURE_MAX_CHARS])
        tmp.replace(target)

    def clear_failure(self) -> None:
        (self.directory / KEEPER_FAILURE).unlink(missing_ok=True)

    def last_failure(self) -> str | None:
        try:
            with (self.directory / KEEPER_FAILURE).open(errors="replace") as failure:
                return failure.read(_FAILURE_MAX_CHARS)
        except FileNotFoundError:
            return None

    def release(self, template_id: str | None, registry: Registry) -> bool:
        """Remove a template as soon as its last sandbox (and named snapshot) is gone, unless it is the published
        one."""
        if not template_id or not template_id.startswith("tpl-") or "/" in template_id:
            return False  # none, or not a template's name: never a path to remove
        current = self.current()
        if current is not None and current.template_id == template_id:
            return False
        if template_id in registry.template_ids():
            return False
        shutil.rmtree(self.directory / template_id, ignore_errors=True)
        return True

    def remove_unused(self, registry: Registry, min_age_s: float = _YOUNG_S) -> list[str]:
        """Delete templates that are neither published nor mapped by any sandbox nor held by a named snapshot.
        Templates younger than
        `min_age_s` are spared: a fork is still starting the clones that will reference them."""
        current = self.current()
        in_use = registry.template_ids()
        removed = []
        now = time.time()
        for directory in sorted(self.directory.glob("tpl-*")):
            try:
                young = now - directory.stat().st_mtime < min_age_s
            except FileNotFoundError:
                continue
            if young or (current is not None and directory.name == current.template_id):
                continue
            if directory.name not in in_use:
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory.name)
        return removed
