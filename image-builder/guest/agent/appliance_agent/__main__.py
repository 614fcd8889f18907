"""`python3 -m appliance_agent`: the guest agent, PID 1 of the guest (or a test subprocess on a host).

Without options it serves every virtio-serial port named protocol.AGENT_PORT_PREFIX<n> (one per host
connection). For tests, any combination of: --stdio (requests on stdin, events on stdout), --fd N (an
inherited socket or pty), --device PATH (a character device or a unix socket to connect to), and --code-user
NAME (run user code as that user; in the guest the kernel command line chooses, see codeuser.py).
"""

from __future__ import annotations

import os
import sys
import time

from appliance_agent import codeuser, protocol, sysops
from appliance_agent.agent import Agent
from appliance_agent.channel import open_channel
from appliance_agent.loop import Loop

PORT_WAIT_S = 0.05


USAGE = ("usage: python3 -m appliance_agent [--stdio] [--device PATH]... [--fd N]... [--subreaper] "
         "[--code-user NAME]")


class Options:
    def __init__(self) -> None:
        self.stdio = False
        self.device: list[str] = []
        self.fd: list[int] = []
        self.subreaper = False  # adopt orphaned descendants as PID 1 would (for tests on a host)
        self.code_user: str | None = None  # None: root on a host, the kernel command line's choice in a guest


def parse_args(argv: list[str]) -> Options:
    """By hand: argparse (and gettext) cost PID 1 boot time under TCG, for four options."""
    options = Options()
    args = list(argv)
    while args:
        name, has_value, value = args.pop(0).partition("=")
        if name in ("--device", "--fd", "--code-user"):
            if not has_value:
                if not args:
                    _usage_error(f"{name} needs a value")
                value = args.pop(0)
            if name == "--device":
                options.device.append(value)
            elif name == "--code-user":
                options.code_user = value
            elif value.isdigit():
                options.fd.append(int(value))
            else:
                _usage_error(f"--fd needs a descriptor number, not {value!r}")
        elif name == "--stdio" and not has_value:
            options.stdio = True
        elif name == "--subreaper" and not has_value:
            options.subreaper = True
        elif name in ("-h", "--help"):
            print(f"{__doc__}\n{USAGE}")
            sys.exit(0)
        else:
            _usage_error(f"unknown argument {name!r}")
    return options


def _usage_error(message: str) -> None:
    print(f"{USAGE}\nappliance_agent: {message}", file=sys.stderr)
    sys.exit(2)


def wait_for_ports() -> list[str]:
    """All agent ports (one per host connection) once the first one exists; its module may load late."""
    announced = False
    while True:
        ports = sysops.find_virtio_ports(protocol.AGENT_PORT_PREFIX)
        if protocol.AGENT_PORT_NAME in ports:
            return [ports[name] for name in sorted(ports)]
        if not announced:
            sysops.log(f"waiting for the virtio-serial port {protocol.AGENT_PORT_NAME}")
            announced = True
        time.sleep(PORT_WAIT_S)


def code_user(args: Options, pid1: bool) -> codeuser.CodeUser | None:
    name = args.code_user if args.code_user is not None else (codeuser.from_cmdline() if pid1 else None)
    if name is None or name == "root":
        return None
    try:
        return codeuser.resolve(name)
    except KeyError:
        # An image without the user (it is made by the image recipe): say so loudly; refusing to run any code
        # would make the sandbox useless, and the host sees the uid in every exec.
        sysops.log(f"no guest user {name!r}: user code runs as root")
        return None


def serve(args: Options) -> None:
    pid1 = sysops.is_pid1()
    sysops.prepare_process()
    # Not dumpable: user code under another uid cannot ptrace the agent, take its descriptors (pidfd_getfd) or
    # read /proc/<agent>/fd and /proc/<agent>/mem.
    if not sysops.prctl(sysops.PR_SET_DUMPABLE, 0):
        sysops.log("could not make the agent non-dumpable")
    user = code_user(args, pid1)
    if args.subreaper and not sysops.become_subreaper():
        sysops.log("could not become a child subreaper")
    channels = [open_channel(fd=fd) for fd in args.fd] + [open_channel(path=path) for path in args.device]
    if args.stdio:
        channels.append(open_channel(stdio=True))
    if not channels:
        channels = [open_channel(path=path) for path in wait_for_ports()]
    loop = Loop()
    agent = Agent(loop, die_with_agent=not pid1, pid1=pid1, code_user=user)
    for read_fd, write_fd, reconnecting in channels:
        agent.attach(read_fd, write_fd, reconnecting=reconnecting)
    agent.run()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        serve(args)
    except Exception:
        sysops.log("fatal error:\n" + sysops.format_exc())
        if sysops.is_pid1():
            # The kernel panics when PID 1 exits: start over instead. The old worker sees its request pipe
            # close and exits; the new agent reaps it.
            time.sleep(1)
            os.execv(sys.executable, [sys.executable, "-m", "appliance_agent", *sys.argv[1:]])
        sys.exit(1)
    # A normal return means a test's channel (stdin, a socket) closed; virtio ports never do.


if __name__ == "__main__":
    main()
