"""The README's promises that a test can hold it to: its count of the suite is the suite's."""

from __future__ import annotations

from tests import suite_counts


def test_the_readme_counts_the_suite_as_it_is():
    written = suite_counts.readme_sentence(suite_counts.README.read_text())
    assert written is not None, "README.md lost its suite-counts block"
    assert written == suite_counts.sentence(suite_counts.count()), "run: python -m tests.suite_counts --write"
