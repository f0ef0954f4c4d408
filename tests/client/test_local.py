"""LocalServer's ports: chosen where no other process's bind(0) or outgoing connection can take them before the
server binds them (vLLM's engine takes ports of its own as it starts)."""

from __future__ import annotations

import socket
from pathlib import Path

from instructd.client.local import free_port


def test_free_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < ephemeral for port in ports), sorted(ports)[-5:]
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
