"""The VMM launcher daemon: the root half of a node. It starts each sandbox's QEMU in the jail (engine/jail.py),
stops it, and attaches networks (engine/network.py) for an API that runs as an unprivileged user. Its client is
engine/launch.py (RemoteLauncher), its request checks engine/launch_checks.py. Run it with `appliance launcher`
(a systemd unit on a node).

Who may ask: the uids in the launcher's own `allowed_uids` (the API's user, from its command line, never from a
client; it must name one) and root, checked by SO_PEERCRED on each connection; the socket's mode (0660, the
service's group) is only the first fence. What they may ask is bounded by the scope, never by trust: a client names
VMs by id; the launcher makes their directories in its own root-owned directory (scope.vms_dir), binds images only
from a root-owned store, and makes every file operation relative to a directory descriptor (engine/dirfd.py). The
ordered steps of a start are in docs/security.md ("The launcher's steps").
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import socket
import socketserver
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engine import dirfd, network
from service.engine.errors import LauncherError
from service.engine.jail import Jail, JailPolicy
from service.engine.launch import LAUNCHER_FILE, MAX_REQUEST, JailedLauncher
from service.engine.launch_checks import LauncherScope, check_start, check_vm_dir
from service.engine.netpolicy import PolicyError, resolved_from_json
from service.engine.network import NetworkSettings
from service.engine.vm import VirtualMachine

log = logging.getLogger("appliance.launcher")


@dataclass(frozen=True)
class LauncherConfig:
    socket_path: Path
    scope: LauncherScope
    policy: JailPolicy
    network: NetworkSettings  # isolation.network_range
    client_group: str | None = None  # the socket's group (the API's); None: root's
    allowed_uids: frozenset[int] = field(default_factory=frozenset)  # the API's user (required), besides root


class Launcher:
    def __init__(self, config: LauncherConfig) -> None:
        self.config = config
        self.jail = Jail(config.policy, memory_root=config.scope.run_root)
        self.launcher = JailedLauncher(self.jail)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"uid": self.jail.identity.uid, "gid": self.jail.identity.gid}
        if op == "start":
            machine, incoming, vm_id = check_start(request, self.config.scope)
            vm = self.launcher.start(machine, self.config.scope.vms_dir, incoming=incoming, detach=True, vm_id=vm_id)
            vm.close_monitor()
            try:
                vm_fd = dirfd.open_dir(vm.dir)
                try:
                    dirfd.write_new(vm_fd, LAUNCHER_FILE, f"{self.config.socket_path}\n")
                finally:
                    os.close(vm_fd)
            except OSError as exc:  # a name planted in the VM dir (the VM group can write there): no VM then
                vm.stop()
                raise LauncherError(f"cannot record the launcher in {vm.dir}: {exc}") from None
            return {"vm_dir": str(vm.dir), "pid": vm.pid}
        if op == "stop":
            vm_dir = check_vm_dir(request.get("vm_dir"), self.config.scope)
            VirtualMachine.for_dir(vm_dir).stop(keep_files=bool(request.get("keep_files")))
            return {}
        if op == "attach_network":
            vm_dir = check_vm_dir(request.get("vm_dir"), self.config.scope)
            try:
                resolved = resolved_from_json(request.get("resolved"))
            except PolicyError as exc:
                raise LauncherError(str(exc)) from None
            vm = VirtualMachine.for_dir(vm_dir)
            try:  # the launcher's own address range, never one a client names
                attachment = self.launcher.attach_network_host(vm, resolved, self.config.network)
            finally:
                vm.close_monitor()
            return {"slot": attachment.slot.index, "range": str(attachment.slot.cidr), "mac": attachment.mac}
        raise LauncherError(f"unknown op {op!r}")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        uid = _peer_uid(self.connection)
        line = self.rfile.readline(MAX_REQUEST + 1)  # read before any answer: the client sees the answer, no EPIPE
        if uid != 0 and uid not in self.server.launcher.config.allowed_uids:
            log.warning("launcher: refused a request from uid %d (not root, not in allowed_uids)", uid)
            self._answer({"ok": False, "error": f"uid {uid} may not use this launcher (it serves "
                          f"{_uid_list(self.server.launcher.config.allowed_uids)})"})
            return
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self._answer({"ok": False, "error": f"a request is one JSON object per line: {exc}"})
            return
        try:
            answer = {"ok": True, **self.server.launcher.handle(request)}
        except (LauncherError, network.NetworkError) as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a request must never take the launcher down
            log.exception("launcher: %s failed", request.get("op"))
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self._answer(answer)

    def _answer(self, answer: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    launcher: Launcher


def _uid_list(allowed: frozenset[int]) -> str:
    return ", ".join(["root", *(f"uid {uid}" for uid in sorted(allowed))])


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def prepare_vms_dir(vms_dir: Path) -> None:
    """The launcher's own directory for VM dirs: made if missing (0711: clients reach their VMs' sockets by name
    but cannot list or write it), and refused unless it and every directory above it are root's alone."""
    if not vms_dir.is_dir():
        vms_dir.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            vms_dir.mkdir(mode=0o711)
    fd = dirfd.open_root_owned_dir(vms_dir)
    os.fchmod(fd, 0o711)
    os.close(fd)


def serve(config: LauncherConfig) -> _Server:
    """Bind the socket (0660, the client group) and return the server; call serve_forever() on it."""
    if not config.allowed_uids:  # a launcher that serves no one but root is a misconfiguration, said at once
        raise ValueError("no allowed user: name the API's user (--allow-user)")
    prepare_vms_dir(config.scope.vms_dir)
    launcher = Launcher(config)
    path = config.socket_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o117)
    try:
        server = _Server(str(path), _Handler)
    finally:
        os.umask(old_umask)
    gid = grp.getgrnam(config.client_group).gr_gid if config.client_group else 0
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
    server.launcher = launcher
    log.info("VMM launcher listening on %s (group %s), serving %s, VMs as uid %d", path,
             config.client_group or "root", _uid_list(config.allowed_uids), launcher.jail.identity.uid)
    return server
