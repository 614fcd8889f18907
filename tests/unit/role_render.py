"""Render a role's template the way Ansible does (ansible-core's own Templar, so its filters and its strict
undefined behave as on a real run), from the role's defaults and vars plus the variables a test gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


def _trusted(value: Any) -> Any:
    """Role files are trusted templates (ansible-core 2.19 renders only strings marked so)."""
    from ansible.template import trust_as_template

    if isinstance(value, str):
        return trust_as_template(value)
    if isinstance(value, list):
        return [_trusted(item) for item in value]
    if isinstance(value, dict):
        return {key: _trusted(item) for key, item in value.items()}
    return value


def role_variables(role: str, **given: Any) -> dict[str, Any]:
    variables: dict[str, Any] = {"ansible_managed": "Ansible managed"}
    for name in ("defaults/main.yml", "vars/main.yml"):
        variables.update(_trusted(yaml.safe_load((ROLES / role / name).read_text()) or {}))
    variables.update(given)
    return variables


def render(role: str, template: str, **given: Any) -> str:
    """roles/<role>/templates/<template> rendered with the role's variables and `given` (which win)."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    source = (ROLES / role / "templates" / template).read_text()
    templar = Templar(loader=DataLoader(), variables=role_variables(role, **given))
    rendered = str(templar.template(_trusted(source)))
    # the template module keeps the source's trailing newline (HAProxy refuses a file without one)
    return rendered + "\n" if source.endswith("\n") and not rendered.endswith("\n") else rendered
