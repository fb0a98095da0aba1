"""Which network interface this machine's workers use to reach the others (gloo, several machines).

Gloo advertises the address that the host name resolves to, and on Debian's default /etc/hosts
(`127.0.1.1 hostname`) and in many containers that is loopback: machines with their own network stacks
then cannot connect ("Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"). The
interface that routes to the main machine is the one the others can reach this machine by. NCCL is left
to its own choice (it skips loopback itself and prefers InfiniBand) unless the user sets
NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time

import psutil

from distrnn.errors import DistrnnError


def route_source(destination: str) -> str:
    """The local address the kernel picks for traffic to `destination`, as `ip route get` answers: a UDP
    socket's connect() chooses the route and sends nothing."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(destination).version == 6 else socket.AF_INET
    except ValueError:  # a host name: resolve it first
        try:
            destination = socket.gethostbyname(destination)
        except OSError as e:
            raise DistrnnError(f"--main-process-ip {destination} does not resolve ({e.strerror or e}); pass the "
                               "main machine's address") from None
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((destination, 9))  # the discard port; a datagram socket connects without sending
        except OSError as e:
            raise DistrnnError(f"no route from this machine to --main-process-ip {destination} ({e.strerror or e}); "
                               "check the address and this machine's network") from None
        return probe.getsockname()[0]


def interface_with(address: str) -> str | None:
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addresses):
            return name
    return None


def gloo_interface(main_ip: str) -> tuple[str, str, bool]:
    """(interface, its address, whether the user chose it): GLOO_SOCKET_IFNAME if set, else the interface
    whose address routes to the main machine."""
    chosen = os.environ.get("GLOO_SOCKET_IFNAME")
    if chosen:
        addresses = [a.address for a in psutil.net_if_addrs().get(chosen.split(",")[0], [])
                     if a.family in (socket.AF_INET, socket.AF_INET6)]
        return chosen, addresses[0] if addresses else "?", True
    source = route_source(main_ip)
    name = interface_with(source)
    if name is None:
        raise DistrnnError(f"the address {source} that routes to {main_ip} is on no interface of this machine; set "
                           "GLOO_SOCKET_IFNAME to the interface the other machines reach this one by")
    return name, source, False


def wait_for_main(address: str, port: int, timeout: float) -> float:
    """Wait until the main machine accepts connections on its rendezvous port; the seconds left of `timeout`.

    Written here rather than left to torchrun's static rendezvous: its TCPStore client retries on its own
    schedule (25 s for a 10 s timeout here), inside C++, and says only that a socket timed out."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
            if probe.connect_ex((address, port)) == 0:
                return deadline - time.monotonic()
        if time.monotonic() >= deadline:
            raise DistrnnError(f"the main machine at {address}:{port} did not answer within {timeout:.0f} s "
                               "(--rendezvous-timeout); start machine 0 with the same --main-process-port, and "
                               "check that this machine can reach that address and port")
        time.sleep(0.5)
