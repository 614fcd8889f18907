"""E2B's own SDKs from PyPI, as clients only: each pinned pair of versions in its own venv under
~/.cache/appliance/e2b-sdk/ (the project never imports them; tests run a client script with that venv's Python)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (e2b, e2b-code-interpreter): the newest validated, and the floor (the first with E2B_API_URL/E2B_SANDBOX_URL).
VERSIONS = {"newest": ("2.63.0", "2.11.5"), "floor": ("2.39.1", "2.9.0")}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "appliance" / "e2b-sdk"


def sdk_python(name: str) -> Path:
    """The Python of a venv holding that SDK pair; made once (pip, about a minute), then reused."""
    e2b, code_interpreter = VERSIONS[name]
    root = CACHE / f"e2b-{e2b}-ci-{code_interpreter}"
    if not (root / ".installed").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=CACHE))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
            subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", f"e2b=={e2b}",
                            f"e2b-code-interpreter=={code_interpreter}"], check=True, timeout=900)
            (building / ".installed").touch()
            shutil.rmtree(root, ignore_errors=True)
            # moved in one step, so a half-made venv is never used; its python finds the venv by pyvenv.cfg beside
            # bin/ (only the pip scripts' shebangs name the old path, and they are not used)
            building.rename(root)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return root / "bin" / "python"
