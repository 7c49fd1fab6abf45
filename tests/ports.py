"""Free localhost ports for the tests that start their own Ray clusters."""
from __future__ import annotations

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: every probe socket stays bound until all are chosen, since
    the kernel may hand a just-closed port straight back (two Ray components on one port)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
