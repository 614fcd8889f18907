"""Guards over the test suite itself: no test asserts how fast something was, and none sleeps in place of a condition.

Speeds are measured in bench/; a test waits for the condition it means, with a deadline that only a hang reaches
(HANG_DEADLINE_S). The check reads the source of every module under tests/ (no import, no run) and reports:

- an elapsed time compared with a number under HANG_DEADLINE_S: a difference of two clock readings
  (time.monotonic/perf_counter/time, or names that hold one), a name that holds such a difference (or a list of
  them), or a name that says it is one (elapsed, duration, took, latency), set against a constant bound;
- a deadline `clock() + K` with K under HANG_DEADLINE_S that an assert (or an `if` that raises) holds the clock to;
- time.sleep/asyncio.sleep of a constant outside a polling loop (a `while` with a condition, or a loop that can
  end by break, return, raise or assert).
A guest's clock compared with the host's (one reading, not a difference of two) is a correctness check, not a
speed, and passes. Anything else that must stay is listed in ALLOWED with its reason.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
HANG_DEADLINE_S = 60.0
CLOCKS = frozenset({"monotonic", "perf_counter", "time", "monotonic_ns", "perf_counter_ns", "time_ns"})
BARE_CLOCKS = CLOCKS - {"time", "time_ns"}  # `time()` alone is too often something else
TIMING_WORDS = re.compile(r"elapsed|duration|took|latency", re.IGNORECASE)
CONTAINER_ADDS = frozenset({"append", "extend", "add", "insert", "appendleft"})
ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
LOOPS = (ast.For, ast.AsyncFor, ast.While)
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

# (path under the repository, top-level function, rule) -> why it stays.
ALLOWED: dict[tuple[str, str, str], str] = {
    (
        "tests/integration/test_fork_freeze_live.py",
        "test_freeze_stops_the_vm_and_resume_restores_the_state_and_the_clock",
        "sleep",
    ): "host time must pass while the guest is frozen, so that the resume has a clock gap to correct: the sleep "
    "is the input of the clock check, not a wait for a condition",
}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    function: str
    rule: str  # "elapsed", "deadline" or "sleep"
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function}: {self.message}"


def _is_clock_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id == "time" and func.attr in CLOCKS
    return isinstance(func, ast.Name) and func.id in BARE_CLOCKS


def _walk_values(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, minus the arguments of len(): the length of a list of timings is a count, not a time."""
    yield node
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len":
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk_values(child)


def _estimate(node: ast.AST, constants: dict[str, float]) -> float | None:
    """A number for a constant bound; unknown terms of a sum count as 0 (a bound like `3 + grace_s + 30`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _estimate(node.operand, constants)
        return None if value is None else -value
    if isinstance(node, ast.BinOp):
        left, right = _estimate(node.left, constants), _estimate(node.right, constants)
        if isinstance(node.op, ast.Add) and (left is not None or right is not None):
            return (left or 0.0) + (right or 0.0)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div) and right:
            return left / right
    return None


def _assigned(node: ast.AST) -> Iterator[tuple[ast.AST, ast.AST]]:
    """(target, value) pairs: assignments, loop and comprehension targets, and values put into containers."""
    if isinstance(node, ast.Assign):
        for target in node.targets:
            yield target, node.value
    elif isinstance(node, ast.AnnAssign | ast.AugAssign | ast.NamedExpr) and node.value is not None:
        yield node.target, node.value
    elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
        yield node.target, node.iter
    elif (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CONTAINER_ADDS
        and node.args
    ):
        yield node.func.value, node.args[-1]


def _names_in(target: ast.AST) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _names_in(element)
    elif isinstance(target, ast.Starred):
        yield from _names_in(target.value)
    elif isinstance(target, ast.Subscript | ast.Attribute) and isinstance(target.value, ast.Name):
        yield target.value.id  # peak["kib"] = ..., box.value = ...


class _FunctionCheck:
    """One top-level function (its nested functions share its names)."""

    def __init__(self, function: ast.AST, constants: dict[str, float]) -> None:
        self.function = function
        self.constants = constants
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(function):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.clock_names: set[str] = set()
        self.elapsed_names: set[str] = set()
        self.deadlines: dict[str, float] = {}  # name -> K of `name = clock() + K`
        self._propagate()

    def clock_derived(self, node: ast.AST) -> bool:
        return any(
            _is_clock_call(sub) or (isinstance(sub, ast.Name) and sub.id in self.clock_names)
            for sub in _walk_values(node)
        )

    def elapsed(self, node: ast.AST) -> bool:
        for sub in _walk_values(node):
            if (
                isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Sub)
                and self.clock_derived(sub.left) and self.clock_derived(sub.right)
            ):
                return True
            if isinstance(sub, ast.Name) and (sub.id in self.elapsed_names or TIMING_WORDS.search(sub.id)):
                return True
            if isinstance(sub, ast.Attribute) and TIMING_WORDS.search(sub.attr):
                return True
        return False

    def _propagate(self) -> None:
        pairs = [pair for node in ast.walk(self.function) for pair in _assigned(node)]
        for target, value in pairs:
            if (
                isinstance(target, ast.Name) and isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add)
                and _is_clock_call(value.left) and (budget := _estimate(value.right, self.constants)) is not None
            ):
                self.deadlines[target.id] = budget
        changed = True
        while changed:
            changed = False
            for target, value in pairs:
                for name in _names_in(target):
                    if name not in self.clock_names and self.clock_derived(value):
                        self.clock_names.add(name)
                        changed = True
                    if name not in self.elapsed_names and self.elapsed(value):
                        self.elapsed_names.add(name)
                        changed = True

    def _bound(self, node: ast.AST) -> float | None:
        if self.clock_derived(node) or self.elapsed(node):
            return None
        return _estimate(node, self.constants)

    def _fails_the_test(self, node: ast.AST) -> bool:
        """Inside an assert, or in the test of an `if` whose body raises or calls pytest.fail."""
        child, parent = node, self.parents.get(node)
        while parent is not None and not isinstance(parent, FUNCTIONS):
            if isinstance(parent, ast.Assert) and child is parent.test:
                return True
            if isinstance(parent, ast.If) and child is parent.test:
                return any(
                    isinstance(sub, ast.Raise)
                    or (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) and sub.func.attr == "fail")
                    for statement in parent.body for sub in ast.walk(statement)
                )
            child, parent = parent, self.parents.get(parent)
        return False

    def _is_poll(self, loop: ast.AST) -> bool:
        if isinstance(loop, ast.While) and not (isinstance(loop.test, ast.Constant) and loop.test.value):
            return True
        pending = list(loop.body)  # type: ignore[attr-defined]
        while pending:
            node = pending.pop()
            if isinstance(node, ast.Break | ast.Return | ast.Raise | ast.Assert):
                return True
            if not isinstance(node, FUNCTIONS):
                pending.extend(ast.iter_child_nodes(node))
        return False

    def _in_poll(self, node: ast.AST) -> bool:
        parent = self.parents.get(node)
        while parent is not None and not isinstance(parent, FUNCTIONS):
            if isinstance(parent, LOOPS):
                return self._is_poll(parent)
            parent = self.parents.get(parent)
        return False

    def findings(self) -> Iterator[tuple[int, str, str]]:
        for node in ast.walk(self.function):
            if isinstance(node, ast.Compare):
                yield from self._compare(node)
            elif isinstance(node, ast.Call) and self._is_sleep(node):
                seconds = _estimate(node.args[0], self.constants) if node.args else None
                if seconds is not None and seconds > 0 and not self._in_poll(node):
                    yield node.lineno, "sleep", f"sleeps {seconds:g} s in place of a condition (no polling loop)"

    def _compare(self, node: ast.Compare) -> Iterator[tuple[int, str, str]]:
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if not isinstance(op, ORDERING):
                continue
            for measured, bound_node in ((left, right), (right, left)):
                if self.elapsed(measured):
                    bound = self._bound(bound_node)
                    if bound is not None and 0 < bound < HANG_DEADLINE_S:
                        yield node.lineno, "elapsed", f"an elapsed time compared with {bound:g} s"
                        return
                if (
                    isinstance(bound_node, ast.Name) and bound_node.id in self.deadlines
                    and self.clock_derived(measured) and 0 < self.deadlines[bound_node.id] < HANG_DEADLINE_S
                    and self._fails_the_test(node)
                ):
                    budget = self.deadlines[bound_node.id]
                    yield node.lineno, "deadline", f"a {budget:g} s deadline fails the test (hang deadlines: 60 s)"
                    return

    @staticmethod
    def _is_sleep(node: ast.Call) -> bool:
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            return func.attr == "sleep" and func.value.id in {"time", "asyncio"}
        return isinstance(func, ast.Name) and func.id == "sleep"


def _module_constants(tree: ast.Module) -> dict[str, float]:
    constants: dict[str, float] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and statement.value is not None:
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            value = _estimate(statement.value, constants)
            for target in targets:
                if isinstance(target, ast.Name) and value is not None:
                    constants[target.id] = value
    return constants


def _top_level_functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            yield statement
        elif isinstance(statement, ast.ClassDef):
            for member in statement.body:
                if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield member


def check_source(source: str, path: str = "<snippet>") -> list[Finding]:
    tree = ast.parse(source)
    constants = _module_constants(tree)
    findings = []
    for function in _top_level_functions(tree):
        for line, rule, message in _FunctionCheck(function, constants).findings():
            findings.append(Finding(path, line, function.name, rule, message))
    return sorted(set(findings), key=lambda finding: (finding.path, finding.line, finding.rule))


def check_suite() -> tuple[list[Finding], list[Finding]]:
    """(findings, allowed findings) over every module under tests/."""
    found, allowed = [], []
    for path in sorted(TESTS.rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        for finding in check_source(path.read_text(encoding="utf-8"), relative):
            key = (finding.path, finding.function, finding.rule)
            (allowed if key in ALLOWED else found).append(finding)
    return found, allowed


# ---- the suite ------------------------------------------------------------------------------------------------------


def test_no_test_asserts_a_speed_or_sleeps_in_place_of_a_condition() -> None:
    found, _ = check_suite()
    assert not found, "timing asserts and fixed sleeps (measure speeds in bench/; wait for conditions):\n" + "\n".join(
        str(finding) for finding in found
    )


def test_every_allowed_exception_is_still_needed() -> None:
    _, allowed = check_suite()
    used = {(finding.path, finding.function, finding.rule) for finding in allowed}
    assert set(ALLOWED) <= used, f"stale entries in ALLOWED: {sorted(set(ALLOWED) - used)}"


# ---- the checker, on snippets ---------------------------------------------------------------------------------------


def rules(snippet: str) -> list[tuple[int, str]]:
    return [(finding.line, finding.rule) for finding in check_source(textwrap.dedent(snippet))]


def test_a_difference_of_clock_readings_under_the_hang_deadline_is_flagged() -> None:
    assert rules("""
        import time
        def test_fast():
            started = time.monotonic()
            work()
            assert time.monotonic() - started < 3
    """) == [(6, "elapsed")]


def test_a_lower_bound_through_recorded_arrival_times_is_flagged() -> None:
    assert rules("""
        import time
        def test_streams(events):
            arrivals = []
            for line in events:
                arrivals.append((time.monotonic(), line))
            first = next(t for t, e in arrivals if e == "a")
            done_at = arrivals[-1][0]
            assert done_at - first > 0.3
    """) == [(9, "elapsed")]


def test_a_median_of_timed_samples_and_a_named_elapsed_time_are_flagged() -> None:
    assert rules("""
        import time
        LIMIT = 0.005
        def test_round_trip():
            samples = []
            for _ in range(300):
                started = time.perf_counter()
                call()
                samples.append(time.perf_counter() - started)
            samples.sort()
            assert len(samples) == 300
            assert samples[len(samples) // 2] < LIMIT
        def test_output(result):
            elapsed = measure()
            assert elapsed < 5, "too slow"
            assert 0.6 < result.duration_s
    """) == [(12, "elapsed"), (15, "elapsed"), (16, "elapsed")]


def test_a_bound_with_a_configured_term_is_estimated_from_its_constants() -> None:
    assert rules("""
        import time
        def test_hostile(victim):
            started = time.monotonic()
            assert time.monotonic() - started < 3 + victim.limits.grace_s + 30
    """) == [(5, "elapsed")]


def test_a_short_deadline_that_fails_the_test_is_flagged_and_a_hang_deadline_is_not() -> None:
    assert rules("""
        import time
        def test_short():
            deadline = time.monotonic() + 5
            while not ready():
                assert time.monotonic() < deadline
                time.sleep(0.02)
        def test_raises():
            deadline = time.monotonic() + 10
            while not ready():
                if time.monotonic() > deadline:
                    raise TimeoutError("not ready")
                time.sleep(0.02)
        def test_hang_deadline():
            deadline = time.monotonic() + 60
            while not ready():
                assert time.monotonic() < deadline, "hung"
                time.sleep(0.02)
        def stop_gracefully(process):
            deadline = time.monotonic() + 15  # a grace period before SIGKILL, not a check
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            process.kill()
    """) == [(6, "deadline"), (11, "deadline")]


def test_fixed_sleeps_outside_a_polling_loop_are_flagged() -> None:
    assert rules("""
        import asyncio, time
        from time import sleep
        def test_waits():
            start_server()
            time.sleep(0.5)
            for _ in range(3):
                ping()
                sleep(1)
        async def test_async():
            await asyncio.sleep(0.1)
    """) == [(6, "sleep"), (9, "sleep"), (11, "sleep")]


def test_polls_and_clock_checks_pass() -> None:
    assert rules("""
        import time
        POLL_S = 0.05
        def test_polls(sampling, guest):
            while not sampling.is_set():
                time.sleep(POLL_S)
            for _ in range(50):
                if done():
                    break
                time.sleep(0.02)
            while True:
                if done():
                    return
                time.sleep(0.02)
            time.sleep(0)
            time.sleep(delay())
        def test_clocks(guest):
            assert abs(float(guest.time()) - time.time()) < 1.0
            before = time.time()
            value = guest.time()
            assert before - 1 <= value <= time.time() + 1
            started = time.monotonic()
            assert time.monotonic() - started < 120
    """) == []


def test_an_allowed_exception_names_a_reason() -> None:
    assert all(reason.strip() for reason in ALLOWED.values())
