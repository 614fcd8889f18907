"""`appliance deploy`: verify and unpack a bundle, run one of its playbooks with ansible-playbook, summarize.

ansible-playbook runs with the bundle's roles and playbooks only (nothing from this machine's Ansible setup but its
inventory), `appliance_bundle_dir` pointing at the unpacked bundle, and a small callback plugin that writes task
timings and failures as JSON lines. From those lines we print one line per failed or unreachable host, naming the
task and the reason, so an operator never has to dig through Ansible's output to see what went wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bundle as bundle_mod
from .progress import Progress

PLAYBOOKS = ("site", "deploy", "precheck", "upgrade")
CALLBACK_DIR = Path(__file__).parent / "ansible_callbacks"
_REASON_LIMIT = 300


class DeployError(Exception):
    """A deploy that could not start or did not succeed; the message is one line."""


@dataclass(frozen=True)
class Failure:
    host: str
    task: str
    reason: str
    unreachable: bool = False

    def line(self) -> str:
        what = "unreachable" if self.unreachable else "failed"
        return f"{self.host}: {what} at '{self.task}': {self.reason}"


@dataclass
class Summary:
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    slowest: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.hosts)

    def host_lines(self) -> Iterable[str]:
        for host, counts in self.hosts.items():
            state = "unreachable" if counts.get("unreachable") else "failed" if counts.get("failures") else "ok"
            yield (f"{host}: {state} ({counts.get('changed', 0)} changed, {counts.get('ok', 0)} ok, "
                   f"{counts.get('failures', 0)} failed, {counts.get('skipped', 0)} skipped)")


# --- pure logic ---------------------------------------------------------------------------------------------------


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure_reason(event: Mapping[str, Any]) -> str:
    """One line saying why a task failed, from the fields the callback kept (no tracebacks, no result dumps)."""
    if "item" in event and isinstance(event["item"], Mapping):
        inner = failure_reason(event["item"])
        label = event["item"].get("label")
        return f"{label}: {inner}" if label else inner
    msg = str(event.get("msg", "")).strip()
    if msg.startswith("MODULE FAILURE") or (not msg and (event.get("module_stderr") or event.get("module_stdout"))):
        # A module that crashed: the exception is the last line of its traceback.
        detail = _last_line(str(event.get("module_stderr", ""))) or _last_line(str(event.get("module_stdout", "")))
        msg = f"module crashed: {detail}" if detail else "module crashed"
    elif event.get("stderr") and (not msg or msg == "non-zero return code"):
        msg = f"exit {event.get('rc', '?')}: {_last_line(str(event['stderr']))}"
    msg = " ".join(msg.split()) or "no reason given"
    return msg if len(msg) <= _REASON_LIMIT else msg[: _REASON_LIMIT - 1] + "…"


def summarize(events: Iterable[Mapping[str, Any]]) -> Summary:
    """Per-host counts, the failure that stopped each failed host, and the slowest tasks."""
    summary = Summary()
    last_failure: dict[str, Failure] = {}
    starts: list[tuple[str, float]] = []
    end = None
    for event in events:
        kind = event.get("event")
        if kind == "task":
            starts.append((str(event.get("name", "")), float(event.get("time", 0))))
        elif kind in ("failed", "unreachable") and not event.get("ignored"):
            host = str(event.get("host", "?"))
            last_failure[host] = Failure(host, str(event.get("task", "?")), failure_reason(event),
                                         unreachable=kind == "unreachable")
        elif kind == "stats":
            summary.hosts = {h: dict(c) for h, c in event.get("hosts", {}).items()}
            end = float(event.get("time", 0))
    # A failure inside a block that was rescued does not count: only hosts the stats call failed or unreachable.
    for host, failure in last_failure.items():
        counts = summary.hosts.get(host)
        if counts is None or counts.get("failures") or counts.get("unreachable"):
            summary.failures.append(failure)
    durations: dict[str, float] = {}
    ends = [started for _, started in starts[1:]] + [end or 0.0]
    for (name, started), following in zip(starts, ends, strict=False):
        if following >= started:
            durations[name] = durations.get(name, 0) + following - started
    summary.slowest = sorted(durations.items(), key=lambda item: -item[1])[:5]
    return summary


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed run
    return events


def playbook_argv(ansible_playbook: str, playbook: Path, inventory: Path, extra_vars: Mapping[str, Any],
                  check: bool, limit: str | None) -> list[str]:
    argv = [ansible_playbook, str(playbook), "--inventory", str(inventory), "--extra-vars", json.dumps(extra_vars)]
    if check:
        argv += ["--check", "--diff"]
    if limit:
        argv += ["--limit", limit]
    return argv


def site_ca_dir(inventory: Path, ca_dir: Path | None) -> Path:
    """Where the site CA lives: kept beside the inventory unless the operator says otherwise, so each fleet (one
    inventory) has its own, made once by the node_proxy role on the first deploy and reused on every later one."""
    return (ca_dir if ca_dir is not None else inventory.resolve().parent / "appliance-ca").resolve()


def deploy_vars(unpacked: Path, inventory: Path, ca_dir: Path | None) -> dict[str, str]:
    """The extra variables every playbook gets. The site CA's directory goes in as appliance_site_ca_dir, which
    node_proxy_ca_dir defaults to: an inventory that sets node_proxy_ca_dir itself still wins."""
    return {"appliance_bundle_dir": str(unpacked), "appliance_site_ca_dir": str(site_ca_dir(inventory, ca_dir))}


def playbook_env(base: Mapping[str, str], ansible_dir: Path, events_file: Path) -> dict[str, str]:
    """Only the bundle's roles; our callback on; Ansible's own settings otherwise from the bundle's ansible.cfg."""
    env = dict(base)
    env.update({
        "ANSIBLE_CONFIG": str(ansible_dir / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(ansible_dir / "roles"),
        "ANSIBLE_CALLBACK_PLUGINS": str(CALLBACK_DIR),
        "ANSIBLE_CALLBACKS_ENABLED": "appliance_events",
        "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "false",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "APPLIANCE_EVENTS_FILE": str(events_file),
    })
    return env


# --- running ------------------------------------------------------------------------------------------------------


def find_ansible_playbook() -> str:
    beside = Path(sys.executable).parent / "ansible-playbook"
    found = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    if found is None:
        raise DeployError("ansible-playbook not found: install ansible-core into this environment "
                          "(pip install 'appliance[dev]')")
    return found


def run_deploy(
    *,
    inventory: Path,
    bundle: Path,
    playbook: str = "site",
    check: bool = False,
    limit: str | None = None,
    quiet: bool = False,
    progress: Progress | None = None,
    ca_dir: Path | None = None,
) -> Summary:
    """Verify and unpack the bundle, run the playbook; raise DeployError (one line per failure) if it failed."""
    progress = progress or Progress(quiet=quiet)
    if playbook not in PLAYBOOKS:
        raise DeployError(f"unknown playbook {playbook!r}; choose one of {', '.join(PLAYBOOKS)}")
    if not inventory.exists():
        raise DeployError(f"{inventory}: no such inventory")
    ansible_playbook = find_ansible_playbook()
    with tempfile.TemporaryDirectory(prefix="appliance-deploy-") as scratch_name:
        scratch = Path(scratch_name)
        unpacked = scratch / "bundle"
        with progress.phase("verify and unpack", bundle.name):
            try:
                bundle_mod.unpack_bundle(bundle, unpacked)
            except bundle_mod.BundleError as exc:
                raise DeployError(str(exc)) from None
        ansible_dir = unpacked / "ansible"
        events_file = scratch / "events.jsonl"
        argv = playbook_argv(ansible_playbook, ansible_dir / "playbooks" / f"{playbook}.yml", inventory.resolve(),
                             deploy_vars(unpacked, inventory, ca_dir), check, limit)
        env = playbook_env(os.environ, ansible_dir, events_file)
        label = f"{playbook}.yml{' --check' if check else ''}{f' --limit {limit}' if limit else ''}"
        progress.note(f"running {label}")
        output = subprocess.DEVNULL if quiet else None
        try:
            result = subprocess.run(argv, env=env, cwd=ansible_dir, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=output)
        except OSError as exc:
            raise DeployError(f"cannot run {ansible_playbook}: {exc.strerror}") from None
        summary = summarize(read_events(events_file))
    if result.returncode != 0 or not summary.ok:
        if summary.failures:
            raise DeployError("\n".join(failure.line() for failure in summary.failures))
        if not summary.hosts:
            raise DeployError(f"ansible-playbook exited with {result.returncode} before any host ran a task "
                              "(see its message above: inventory, playbook syntax or --limit)")
        raise DeployError(f"ansible-playbook exited with {result.returncode}")
    return summary
