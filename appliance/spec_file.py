"""Writing appliance.toml: every setting with its default and its description, generated from the spec model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .spec import ApplianceSpec


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        if not value:
            return "[]"
        return "[\n" + "".join(f"    {_toml_value(item)},\n" for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_spec_toml(spec: ApplianceSpec | None = None) -> str:
    """The spec as commented TOML. Unset optional values are written commented out."""
    spec = spec or ApplianceSpec()
    lines = [
        "# appliance.toml: the one declarative spec for images, engine and service.",
        "# Precedence: command-line flags > APPLIANCE_<SECTION>__<KEY> environment variables > this file > defaults.",
        "",
    ]
    for section_name in type(spec).model_fields:
        section: BaseModel = getattr(spec, section_name)
        lines.append(f"[{section_name}]")
        for name, info in type(section).model_fields.items():
            if info.description:
                lines.append(f"# {info.description}")
            value = getattr(section, name)
            if value is None:
                lines.append(f"# {name} =")
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
