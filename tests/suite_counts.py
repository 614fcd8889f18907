"""How many tests each part of the suite has, found by collecting it: the README's numbers are generated, not typed.

    python -m tests.suite_counts           print the sentence
    python -m tests.suite_counts --write   put it into README.md (between the suite-counts markers)

tests/unit/test_readme.py fails when the README's sentence and the suite disagree. The Molecule scenarios'
testinfra checks are reported by name at run time (tests/provisioning/test_molecule.py), not collected here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- suite-counts: python -m tests.suite_counts --write -->", "<!-- /suite-counts -->"
_OUT_ENV = "APPLIANCE_SUITE_COUNTS_OUT"


def pytest_collection_finish(session) -> None:  # this module is also the pytest plugin that counts
    path = os.environ.get(_OUT_ENV)
    if not path:
        return
    kinds = Counter(_kind(item) for item in session.items)
    Path(path).write_text(json.dumps(kinds))


def _kind(item) -> str:
    if "/hostimage/" in str(item.path):
        return "hostimage"
    for marker in ("provisioning", "integration"):
        if item.get_closest_marker(marker) is not None:
            return marker
    return "unit"


def count() -> Counter:
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "counts.json"
        env = {**os.environ, _OUT_ENV: str(out)}
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests.suite_counts"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if not out.exists():
            raise RuntimeError(f"collecting the suite failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return Counter(json.loads(out.read_text()))


def sentence(kinds: Counter) -> str:
    total = sum(kinds.values())
    return (f"{total} tests: {kinds['unit']} unit tests (pure logic, fakes for the impure parts), "
            f"{kinds['integration']} on real microVMs and a real gunicorn, {kinds['provisioning']} provisioning "
            f"tests on throw-away hosts (each Molecule scenario also reports its testinfra checks by name), and "
            f"{kinds['hostimage']} on booted host images")


def readme_sentence(text: str) -> str | None:
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return match.group(1) if match else None


def main() -> int:
    line = sentence(count())
    if "--write" in sys.argv[1:]:
        text = README.read_text()
        if readme_sentence(text) is None:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
        README.write_text(re.sub(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END), f"{BEGIN}\n{line}\n{END}", text,
                                 flags=re.S))
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
