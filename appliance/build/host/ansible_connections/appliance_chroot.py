"""Ansible connection plugin: run tasks inside a directory tree with chroot (the host image's root).

ansible-core has no chroot connection (community.general's is not installable here), and the image build needs
only this much: commands run as root under `chroot ROOT /bin/sh -c`, files go in and out through a process inside
the chroot (`cat`), so a symlink in the image can never make a write land outside it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: appliance_chroot
short_description: Run tasks in a root directory with chroot
description:
  - Runs commands as root inside a directory tree through chroot(8); used by `appliance build host`.
options:
  remote_addr:
    description: The root directory of the image being built.
    default: inventory_hostname
    vars:
      - name: ansible_host
"""

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Connection(ConnectionBase):
    transport = "appliance_chroot"
    has_pipelining = True
    has_tty = False
    default_user = "root"

    def _root(self) -> str:
        root = self.get_option("remote_addr")
        if not os.path.isabs(root) or not os.path.isdir(root):
            raise AnsibleConnectionFailure(f"appliance_chroot: {root} is not a root directory")
        return root

    def _connect(self):
        if shutil.which("chroot") is None:
            raise AnsibleConnectionFailure("appliance_chroot: chroot(8) not found")
        self._root()
        self._connected = True
        return self

    def _argv(self, command: str) -> list[str]:
        return ["chroot", self._root(), "/usr/bin/env", "-i", f"PATH={_PATH}", "HOME=/root", "LANG=C.UTF-8",
                "/bin/sh", "-c", command]

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        result = subprocess.run(self._argv(cmd), input=in_data, capture_output=True, check=False)
        return result.returncode, result.stdout, result.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        with open(in_path, "rb") as source:
            result = subprocess.run(self._argv(f"cat > {shlex.quote(out_path)}"), stdin=source,
                                    capture_output=True, check=False)
        if result.returncode != 0:
            raise AnsibleError(f"appliance_chroot: cannot write {out_path}: {result.stderr.decode(errors='replace')}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        with open(out_path, "wb") as sink:
            result = subprocess.run(self._argv(f"cat {shlex.quote(in_path)}"), stdout=sink, stderr=subprocess.PIPE,
                                    check=False)
        if result.returncode != 0:
            raise AnsibleError(f"appliance_chroot: cannot read {in_path}: {result.stderr.decode(errors='replace')}")

    def close(self):
        self._connected = False
