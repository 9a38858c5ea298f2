"""Which process holds a TCP connection, read from Linux's /proc: no help from the server."""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[int]:
    """The processes ``pid`` started that still run."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def workers(parent: int) -> list[int]:
    """The children of ``parent`` that multiprocessing spawned as workers (not its resource
    tracker)."""
    spawned = []
    for pid in children(parent):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if b"spawn_main" in command:
            spawned.append(pid)
    return spawned


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                return int(fields[9])
    return None


def serving_pid(parent: int, server_port: int, client_port: int) -> int:
    """The child of ``parent`` holding the server's end of the connection that a client made
    from ``client_port`` to ``server_port`` (the connection must be open, and accepted)."""
    inode = _socket_inode(server_port, client_port)
    if inode is None:
        raise AssertionError(f"no connection from port {client_port} to {server_port}")
    target = f"socket:[{inode}]"
    for pid in children(parent):
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no child of {parent} holds the connection from port {client_port}")
