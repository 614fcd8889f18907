"""Every program the host-side code starts is in the one table (appliance/host_tools.py), so `make setup`
installs it and `appliance doctor` checks it.

The scan reads the code with `ast`: it finds calls that start programs (subprocess.*, os.exec*/spawn*,
asyncio.create_subprocess_exec, and the project's own wrappers, found by following which parameter of a function
reaches such a call) and resolves the program at the head of their argv: literals, names assigned in the function
or module, dataclass field defaults (`policy.bwrap`), functions that build and return an argv, `a + b`,
`x if c else y`, `[*prefix, ...]`, and the pieces added with `argv += [...]`. What it cannot resolve is listed in
DYNAMIC with what it runs, so a new unresolvable call fails here until someone says what it starts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance import host_tools
from appliance.build import guest as guest_module
from appliance.build.host import disk
from appliance.build.host import image as host_image_module

REPO = Path(__file__).resolve().parents[2]
SCAN_ROOTS = ("appliance", "service", "image-builder/host", "tests", "bench")
NOT_HOST_SIDE = {
    # runs on the deployed node at boot; its programs come from image-builder/host/packages.txt
    "appliance/node_setup.py",
}
# Calls whose program the scan cannot see, and what each starts (file, enclosing function) -> programs.
DYNAMIC: dict[tuple[str, str], set[str]] = {
    ("appliance/deploy.py", "run_deploy"): {"ansible-playbook"},  # the venv's, beside sys.executable, or on PATH
    ("appliance/commands/doctor.py", "doctor_command"): {"qemu-system-x86_64"},  # machine.QEMU_BINARY, imported
    ("tests/unit/conftest.py", "agent_factory"): {"setpriv", "unshare"},  # prefix=, from tests/unit/test_agent.py
    # APPLIANCE, imported from tests/integration/test_launcher.py: the venv's CLI
    ("tests/integration/test_launcher_attacks.py",
     "test_only_the_apis_uid_is_served_and_a_launcher_must_be_told_which"): {"appliance"},
}
# Programs tests start on purpose although no package has them.
NOT_PROGRAMS = {"no-such-tool-xyz"}  # test_guest_build: the error for a tool that is not installed
SUBPROCESS_FUNCS = {"run", "Popen", "check_output", "check_call", "call"}
PROGRAM_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")

Head = str | None | tuple  # a program name, None (unresolved), or ("param", name, is_argv_list)


@dataclass
class Module:
    path: str
    name: str
    tree: ast.Module
    imports: dict[str, str] = field(default_factory=dict)  # local name -> dotted target
    assigns: dict[str, list[ast.expr]] = field(default_factory=dict)  # module-level name -> values


@dataclass
class Func:
    qualname: str  # module.func or module.Class.method
    module: Module
    node: ast.FunctionDef
    cls: str | None
    assigns: dict[str, list[ast.expr]] | None = None  # name -> values assigned in the function (made on first use)

    @property
    def positional(self) -> list[str]:
        names = [a.arg for a in (*self.node.args.posonlyargs, *self.node.args.args)]
        return names[1:] if self.cls and names and names[0] in ("self", "cls") else names


@dataclass(frozen=True)
class Sink:
    """A call that starts a program: where it is and which argument carries the program."""

    module: Module
    func: Func | None
    call: ast.Call
    argv: ast.expr | None  # the argv list expression
    program: ast.expr | None  # or the program expression itself
    absent: bool = False  # a wrapper called without that argument (its default: no program)

    @property
    def where(self) -> tuple[str, str]:
        return (self.module.path, self.func.node.name if self.func else "<module>")


class Scanner:
    def __init__(self, sources: dict[str, str]) -> None:
        self.modules = [self._module(path, text) for path, text in sources.items()]
        self.funcs: dict[str, Func] = {}
        self.fields: dict[str, list[tuple[Module, ast.expr]]] = {}  # class attribute name -> default values
        self.classes: set[str] = set()
        for module in self.modules:
            self._index(module)
        self.scopes = self._scopes()
        # wrapper qualname -> (positional index or vararg index, keyword, is the argv list?)
        self.wrappers: dict[str, tuple[int, str, bool]] = {}
        self._find_wrappers()

    # --- indexing ---------------------------------------------------------------------------------------------

    @staticmethod
    def _module(path: str, text: str) -> Module:
        name = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".").replace("-", "_")
        module = Module(path, name, ast.parse(text, path))
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else \
                        alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    module.imports[alias.asname or alias.name] = f"{base}.{alias.name}"
        for node in module.tree.body:
            for target, value in _assignments(node):
                module.assigns.setdefault(target, []).append(value)
        return module

    def _index(self, module: Module) -> None:
        for node in module.tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.funcs[f"{module.name}.{node.name}"] = Func(f"{module.name}.{node.name}", module, node, None)
            elif isinstance(node, ast.ClassDef):
                self.classes.add(f"{module.name}.{node.name}")
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        qual = f"{module.name}.{node.name}.{item.name}"
                        self.funcs[qual] = Func(qual, module, item, node.name)
                    for target, value in _assignments(item):
                        self.fields.setdefault(target, []).append((module, value))

    def _scopes(self) -> list[tuple[Module, Func | None, list[ast.Call]]]:
        """Every scope with its calls: module level (functions excluded) and each function (nested ones inline)."""
        scopes: list[tuple[Module, Func | None, list[ast.Call]]] = []
        scopes += [(m, None, list(_calls(m.tree))) for m in self.modules]
        return scopes + [(f.module, f, list(_calls(f.node))) for f in self.funcs.values()]

    # --- calls ------------------------------------------------------------------------------------------------

    def target(self, call: ast.Call, module: Module, func: Func | None) -> str | None:
        """The dotted name a call goes to, as far as imports, self and instances of our classes tell."""
        callee = call.func
        if isinstance(callee, ast.Name):
            local = f"{module.name}.{callee.id}"
            if local in self.funcs or local in self.classes:
                return local
            if callee.id in module.imports:
                return module.imports[callee.id]
            # an instance of our class with a __call__: `apt = Apt(...)` or a parameter `apt: Apt`, then `apt(...)`
            kinds = [v.func for v in self._values(callee.id, module, func) if isinstance(v, ast.Call)]
            if func is not None:
                args = func.node.args
                kinds += [a.annotation for a in (*args.args, *args.kwonlyargs) if a.arg == callee.id and a.annotation]
            for kind in kinds:
                if isinstance(kind, ast.Name):
                    cls = self.target(ast.Call(func=kind, args=[], keywords=[]), module, None)
                    if cls and f"{cls}.__call__" in self.funcs:
                        return f"{cls}.__call__"
            return None
        if isinstance(callee, ast.Attribute):
            base = callee.value
            if isinstance(base, ast.Name):
                if base.id in ("self", "cls") and func and func.cls:
                    return f"{module.name}.{func.cls}.{callee.attr}"
                if base.id in module.imports:
                    return f"{module.imports[base.id]}.{callee.attr}"
        return None

    def sinks(self) -> Iterator[Sink]:
        for module, func, calls in self.scopes:
            for call in calls:
                sink = self._sink(call, module, func)
                if sink is not None:
                    yield sink

    def _sink(self, call: ast.Call, module: Module, func: Func | None) -> Sink | None:
        target = self.target(call, module, func) or ""
        top, _, name = target.rpartition(".")
        if top == "subprocess" and name in SUBPROCESS_FUNCS:
            return Sink(module, func, call, _arg(call, 0, "args"), None)
        if top == "os" and name.startswith(("exec", "spawn", "posix_spawn")):
            index = 1 if name.startswith("spawn") else 0
            return Sink(module, func, call, None, _arg(call, index, "path"))
        if top == "asyncio" and name == "create_subprocess_exec":
            return Sink(module, func, call, None, _arg(call, 0, "program"))
        if target in self.wrappers:
            index, keyword, is_list = self.wrappers[target]
            argument = _arg(call, index, keyword)
            splat = any(k.arg is None for k in call.keywords) or any(isinstance(a, ast.Starred) for a in call.args)
            absent = argument is None and not splat
            return Sink(module, func, call, argument if is_list else None, None if is_list else argument, absent)
        return None

    def _find_wrappers(self) -> None:
        """Functions that pass one of their parameters on as the argv (or the program) of a sink; to a fixpoint."""
        while True:
            found = False
            for sink in list(self.sinks()):
                if sink.func is None or sink.func.qualname in self.wrappers:
                    continue
                for head in self.heads_of(sink):
                    if isinstance(head, tuple):
                        _, param, is_list = head
                        args = sink.func.node.args
                        if args.vararg and args.vararg.arg == param:  # f(*argv): the program is the first of them
                            self.wrappers[sink.func.qualname] = (len(sink.func.positional), "", False)
                        elif param in sink.func.positional:
                            self.wrappers[sink.func.qualname] = (sink.func.positional.index(param), param, is_list)
                        elif param in {a.arg for a in args.kwonlyargs}:
                            self.wrappers[sink.func.qualname] = (-1, param, is_list)
                        else:
                            continue
                        found = True
            if not found:
                return

    # --- what a sink runs -------------------------------------------------------------------------------------

    def heads_of(self, sink: Sink) -> set[Head]:
        if sink.absent:
            return {""}
        if sink.argv is not None:
            return self.heads(sink.argv, sink.module, sink.func, True)
        if sink.program is not None:
            return self.heads(sink.program, sink.module, sink.func, False)
        return {None}

    def programs(self, sink: Sink) -> set[Head]:
        return {h if not isinstance(h, str) else Path(h).name for h in self.heads_of(sink) if h != ""}

    def _values(self, name: str, module: Module, func: Func | None) -> list[ast.expr]:
        if func is not None:
            if func.assigns is None:
                func.assigns = {}
                for node in ast.walk(func.node):
                    for target, value in _assignments(node):
                        func.assigns.setdefault(target, []).append(value)
            if name in func.assigns:
                return func.assigns[name]
        return module.assigns.get(name, [])

    def heads(self, expr: ast.expr, module: Module, func: Func | None, is_list: bool, depth: int = 0) -> set[Head]:
        """What can stand first in `expr` (an argv list if is_list, else a program). "" means an empty list."""
        if depth > 12:
            return {None}
        again = lambda e, lst=is_list, m=module, f=func: self.heads(e, m, f, lst, depth + 1)  # noqa: E731
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value} if not is_list else {None}
        if isinstance(expr, ast.Constant) and expr.value is None:  # no command at all
            return {""}
        if isinstance(expr, ast.List | ast.Tuple):
            if not expr.elts:
                return {""}
            first = expr.elts[0]
            if isinstance(first, ast.Starred):
                found = again(first.value, True)
                if "" in found and len(expr.elts) > 1:
                    found = (found - {""}) | again(ast.List(elts=expr.elts[1:]), True)
                return found
            return again(first, False) if is_list else {None}
        if isinstance(expr, ast.ListComp | ast.GeneratorExp):
            return again(expr.generators[0].iter, True) if is_list else {None}
        if isinstance(expr, ast.IfExp):
            return again(expr.body) | again(expr.orelse)
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add) and is_list:
            found = again(expr.left)
            return (found - {""}) | again(expr.right) if "" in found else found
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div) and not is_list:  # dir / "program"
            return again(expr.right)
        if isinstance(expr, ast.JoinedStr) and not is_list:  # f"{bin_dir}/program"
            last = expr.values[-1] if expr.values else None
            if isinstance(last, ast.Constant) and "/" in str(last.value):
                return {str(last.value).rpartition("/")[2]}
            return {None}
        if isinstance(expr, ast.Subscript) and isinstance(expr.slice, ast.Constant) and expr.slice.value == 0:
            return again(expr.value, True)
        if isinstance(expr, ast.Name):
            return self._name_heads(expr.id, module, func, is_list, depth)
        if isinstance(expr, ast.Attribute):
            if isinstance(expr.value, ast.Name) and expr.value.id == "sys" and expr.attr == "executable":
                return {"python3"} if not is_list else {None}
            defaults = self.fields.get(expr.attr, [])
            found = set().union(*(self.heads(v, m, None, is_list, depth + 1) for m, v in defaults)) if defaults \
                else {None}
            return found
        if isinstance(expr, ast.Call):
            if isinstance(expr.func, ast.Name) and expr.func.id in ("str", "list", "tuple") and expr.args:
                return again(expr.args[0])
            target = self.target(expr, module, func)
            callee = self.funcs.get(target or "")
            if callee is None:
                return {None}
            return self._returned(callee, is_list, depth)
        return {None}

    def _returned(self, func: Func, is_list: bool, depth: int) -> set[Head]:
        """What a function that builds an argv (or a fixture that gives one) returns."""
        values = [n.value for n in ast.walk(func.node) if isinstance(n, ast.Return | ast.Yield) and n.value]
        found = set().union(*(self.heads(v, func.module, func, is_list, depth + 1) for v in values))
        return {h for h in found if not isinstance(h, tuple)} or {None}  # a builder's own parameters: unknown

    def _fixture(self, name: str, module: Module) -> Func | None:
        """The pytest fixture a test's parameter names: in the test's module or a conftest.py above it."""
        package = module.name.rpartition(".")[0]
        candidates = [f"{module.name}.{name}"]
        while package:
            candidates.append(f"{package}.conftest.{name}")
            package = package.rpartition(".")[0]
        return next((self.funcs[c] for c in candidates if c in self.funcs), None)

    def _name_heads(self, name: str, module: Module, func: Func | None, is_list: bool, depth: int) -> set[Head]:
        if func is not None:
            args = func.node.args
            params = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
            if args.vararg:
                params.add(args.vararg.arg)
            if name in params:
                fixture = self._fixture(name, module) if func.node.name.startswith("test") else None
                return self._returned(fixture, is_list, depth) if fixture else {("param", name, is_list)}
        values = self._values(name, module, func)
        if not values:
            return {None}
        found: set[Head] = set()
        for index, value in enumerate(values):
            heads = self.heads(value, module, func, is_list, depth + 1)
            if index == 0:
                found |= heads
            else:  # argv += [...]: its head may be a program run through the first (sh -c, setsid, bwrap ...)
                found |= {h for h in heads if isinstance(h, str) and h[:1].isalnum() and set(h) <= PROGRAM_NAME}
        return found


def _assignments(node: ast.AST) -> Iterator[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign):
        for target in node.targets:
            if isinstance(target, ast.Name):
                yield target.id, node.value
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):  # NFT, IP = "nft", "ip"
                for name, value in zip(target.elts, node.value.elts, strict=False):
                    if isinstance(name, ast.Name):
                        yield name.id, value
    elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name) and node.value:
        yield node.target.id, node.value


def _calls(scope: ast.AST) -> Iterator[ast.Call]:
    """Calls in this scope, not inside the functions and classes defined at module level (they are scopes)."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        if isinstance(scope, ast.Module) and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.Call):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _arg(call: ast.Call, index: int, keyword: str) -> ast.expr | None:
    if 0 <= index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


@dataclass(frozen=True)
class Report:
    programs: dict[str, set[str]]  # program -> where it is started
    unresolved: set[tuple[str, str]]


def scan(sources: dict[str, str]) -> Report:
    scanner = Scanner(sources)
    programs: dict[str, set[str]] = {}
    unresolved: set[tuple[str, str]] = set()
    for sink in scanner.sinks():
        if sink.func is not None and sink.func.qualname in scanner.wrappers:
            continue  # the wrapper's own call: its callers say what it runs
        for head in scanner.programs(sink):
            if isinstance(head, str):
                programs.setdefault(head, set()).add(f"{sink.module.path}:{sink.call.lineno}")
            else:
                unresolved.add(sink.where)
    return Report(programs, unresolved)


def repo_sources() -> dict[str, str]:
    sources = {}
    for root in SCAN_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative not in NOT_HOST_SIDE:
                sources[relative] = path.read_text()
    return sources


KNOWN = {*host_tools.programs(), *host_tools.VENV_PROGRAMS, *NOT_PROGRAMS}


# --- the scan of the repo -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> Report:
    return scan(repo_sources())


def test_every_program_the_host_code_starts_is_in_the_table(report: Report) -> None:
    missing = {program: sorted(where) for program, where in report.programs.items() if program not in KNOWN}
    assert not missing, f"add these to appliance/host_tools.py (program -> started at): {missing}"


def test_the_scan_sees_the_programs_it_must(report: Report) -> None:
    """Guards the scanner against going blind: each of these is started by the code through a different path."""
    for program in ("qemu-system-x86_64", "nft", "ip", "bwrap", "setpriv", "sh", "setsid", "mmdebstrap",
                    "mkfs.ext4", "dpkg-deb", "apt-get", "apt-cache", "tar", "unshare", "mkfs.vfat", "mcopy", "mmd",
                    "sfdisk", "grub-mkimage", "systemd-nspawn", "ssh", "ssh-keygen", "zstd", "qemu-img", "useradd"):
        assert program in report.programs, program


def test_calls_whose_program_the_scan_cannot_see_are_listed(report: Report) -> None:
    assert report.unresolved == set(DYNAMIC), "say what these start in DYNAMIC (and add it to the table)"
    for programs in DYNAMIC.values():
        assert programs <= KNOWN


# --- the scanner itself, on synthetic code ----------------------------------------------------------------------


SNIPPET = '''
import os
import subprocess
from subprocess import check_output as co

NEW = "newtool-c"

def run(phase, argv):
    return subprocess.run([str(a) for a in argv], check=True)

def build_argv(detach):
    argv = ["newtool-g"] if detach else []
    argv += ["sh", "-c", "x"]
    return argv

class Settings:
    tool: str = "newtool-f"

def main(settings: Settings):
    subprocess.run(["newtool-a", "--flag"])
    subprocess.Popen(("newtool-b",))
    co([NEW])
    run("phase", ["newtool-d"])
    os.execvp("newtool-e", ["newtool-e"])
    subprocess.run([settings.tool, "x"])
    subprocess.run(build_argv(True))
'''


def test_the_scanner_reports_a_program_missing_from_the_table() -> None:
    found = scan({"snippet.py": SNIPPET}).programs
    assert {f"newtool-{c}" for c in "abcdefg"} | {"sh"} == set(found)
    assert set(found) - KNOWN == {f"newtool-{c}" for c in "abcdefg"}


def test_the_scanner_reports_what_it_cannot_resolve() -> None:
    report = scan({"snippet.py": "import subprocess\n\ndef f(x):\n    subprocess.run(x.build())\n"})
    assert report.unresolved == {("snippet.py", "f")} and not report.programs


# --- the table and its views -----------------------------------------------------------------------------------


def test_every_entry_names_known_purposes_and_the_views_are_the_table() -> None:
    for entry in (*host_tools.PROGRAMS, *host_tools.DATA):
        assert entry.purposes and set(entry.purposes) <= set(host_tools.PURPOSES), entry
    assert host_tools.programs("guest-image") == guest_module.HOST_TOOLS
    assert host_tools.programs("host-image") == host_image_module.HOST_TOOLS
    assert {"nftables", "qemu-system-x86", "ovmf", "python3-venv"} <= set(host_tools.packages())
    grub = [d for d in host_tools.DATA if d.package.startswith("grub-")]
    assert grub and all(Path(d.path).parent.parent == disk.GRUB_DIR for d in grub)
    from tests.hostimage import nodevm

    assert any(d.path == str(nodevm.OVMF_CODE) for d in host_tools.DATA)


def test_the_makefile_gets_its_packages_from_the_table_with_the_system_python() -> None:
    """`python3 -m appliance.host_tools packages` is what the Makefile runs; it needs nothing but the stdlib."""
    done = subprocess.run([sys.executable, "-S", "-m", "appliance.host_tools", "packages", "networks", "sandboxes"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.split() == ["iproute2", "nftables", "procps", "qemu-system-x86"]
    makefile = (REPO / "Makefile").read_text()
    assert "-m appliance.host_tools" in makefile and "--no-install-recommends" in makefile


# --- QEMU >= 10: the minimum versions and Debian 12's backports ----------------------------------------------------


@pytest.mark.parametrize(("version", "listed"), [
    (None, True),  # not installed
    ("1:7.2+dfsg-7+deb12u18+b3", True),  # Debian 12's own: upgraded
    ("1:10.0~rc1+ds-1", True),  # a release candidate is not the release
    ("1:10.0.2+ds-2+deb13u1~bpo12+1", False),  # bookworm-backports
    ("1:10.1.0+ds-5", False),
])
def test_a_qemu_older_than_the_minimum_is_to_install(version, listed) -> None:
    """Compared by the real `dpkg --compare-versions`: epochs, `~` and backports suffixes as apt sees them."""
    installed = {"qemu-system-x86": version, "iproute2": "6.1.0-3"}
    assert host_tools.to_install("sandboxes", installed=installed.get) == (["qemu-system-x86"] if listed else [])


def test_debian_12_gets_backports_pinned_to_qemu_and_debian_13_nothing(tmp_path) -> None:
    assert host_tools.apt_files("trixie") == {}
    files = host_tools.apt_files("bookworm")
    assert sorted(files) == ["/etc/apt/preferences.d/appliance-qemu-backports.pref",
                             "/etc/apt/sources.list.d/bookworm-backports.sources"]
    preferences = files["/etc/apt/preferences.d/appliance-qemu-backports.pref"]
    records = [dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith("#"))
               for block in preferences.split("\n\n")]
    # apt_preferences(5): the first specific (named or glob) record decides; `*` only what no such record matches
    assert records == [
        {"Package": "qemu-* seabios", "Pin": "release n=bookworm-backports", "Pin-Priority": "500"},
        {"Package": "*", "Pin": "release n=bookworm-backports", "Pin-Priority": "100"},
    ]
    assert "Suites: bookworm-backports\n" in files["/etc/apt/sources.list.d/bookworm-backports.sources"]
    makefile = (REPO / "Makefile").read_text()  # what `make host-packages` runs: these files, then the upgrade
    assert "$(HOST_TOOLS) apt-sources --check" in makefile and "$(SUDO) $(HOST_TOOLS) apt-sources)" in makefile
    assert "$(HOST_TOOLS) to-install" in makefile


def test_apt_files_are_written_only_when_they_differ(tmp_path) -> None:
    files = {str(tmp_path / "a.sources"): "one\n", str(tmp_path / "b.pref"): "two\n"}
    assert host_tools.write_apt_files(files, dry_run=True) == sorted(files)  # `make` asks for sudo only then
    assert not list(tmp_path.iterdir())
    assert host_tools.write_apt_files(files) == sorted(files)
    assert host_tools.write_apt_files(files, dry_run=True) == []
    assert host_tools.write_apt_files(files) == []  # a second `make setup` changes nothing
    (tmp_path / "b.pref").write_text("hand-made\n")
    assert host_tools.write_apt_files(files) == [str(tmp_path / "b.pref")]
    assert (tmp_path / "b.pref").read_text() == "two\n" and (tmp_path / "b.pref").stat().st_mode & 0o777 == 0o644
