"""Machines with network stacks of their own, for tests of what crosses a network and for the fault campaign
(benchmarks/faults.py): Linux network namespaces,
one per machine, each with one veth interface plugged into a bridge in a namespace of its own (the switch).

Every address exists only inside namespaces made here (10.201.N.0/24, N from the test's process id); nothing
is sent anywhere else. Everything made is removed when the `machines()` block ends, also on failure, and every
command the helpers run is bounded in time. Needs root (CI runs as root).

The host name still resolves to 127.0.0.1 inside the namespaces (/etc/hosts is shared), as on Debian's
default /etc/hosts and in many containers: what made gloo advertise loopback to the other machines.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dnt"  # every namespace and interface made here starts with it (names are at most 15 characters)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass(frozen=True)
class Machine:
    namespace: str
    address: str
    interface: str = "eth0"

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside this machine's network stack."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), **kwargs)

    def cut(self) -> None:
        """This machine's link down: its processes run on, and nothing reaches them or leaves."""
        _ip("-n", self.namespace, "link", "set", self.interface, "down")

    def mend(self) -> None:
        """This machine's link up again (after `cut`)."""
        _ip("-n", self.namespace, "link", "set", self.interface, "up")

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.namespace, check=False).stdout.split()]

    def lose(self) -> None:
        """SIGKILL to every process in this machine's network namespace, in three sweeps half a second apart
        (a process started during one is caught by the next): what losing the machine does. Killing a
        launcher's process group is not that: torchrun starts each worker in a session of its own."""
        for _ in range(3):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _tag() -> int:
    return os.getpid() % 200 + 20


@contextmanager
def machines(count: int, names: dict[str, int] | None = None) -> Iterator[list[Machine]]:
    """`count` machines on one switch: 10.201.T.1, 10.201.T.2, ... (T from this process). `names`: host names
    that resolve, inside these namespaces only, to machine i (/etc/netns/NS/hosts, which `ip netns exec`
    mounts over /etc/hosts), as a Kubernetes headless service's names do."""
    tag = _tag()
    switch = f"{PREFIX}{tag}sw"
    made = [switch]
    try:
        _ip("netns", "add", switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        found = []
        for i in range(count):
            name = f"{PREFIX}{tag}m{i}"
            _ip("netns", "add", name)
            made.append(name)
            # the veth pair is made in the machine's namespace, its other end moved into the switch
            _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}")
            _ip("-n", name, "link", "set", f"p{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"p{i}", "up")
            address = f"10.201.{tag}.{i + 1}"
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            found.append(Machine(name, address))
        if names:
            lines = "".join(f"{found[i].address} {host}\n" for host, i in names.items())
            for machine in found:
                hosts = Path("/etc/netns") / machine.namespace / "hosts"
                hosts.parent.mkdir(parents=True, exist_ok=True)
                hosts.write_text(Path("/etc/hosts").read_text() + lines)
        yield found
    finally:
        for name in reversed(made):  # deleting a namespace deletes its interfaces
            _ip("netns", "del", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def leftovers() -> list[str]:
    """Namespaces (and their /etc/netns folders) of this module's that are still there: a test that leaks one
    fails on it."""
    listed = _ip("netns", "list", check=False).stdout.split()
    folders = [p.name for p in Path("/etc/netns").glob(f"{PREFIX}*")] if Path("/etc/netns").is_dir() else []
    return [word for word in listed if word.startswith(PREFIX)] + folders
