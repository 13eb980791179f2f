"""A reference run: the persistent workload with the servers on one core and smtp-source on the other.

In the side-by-side runs every server shares the machine's cores with its
client, and on two cores smtp-source takes a large part of them (about as
much CPU per message as prefork-esmtp itself on persistent sessions), so a
msgs/s ratio there mixes each server's cost with the client's.  Here each
server's whole process tree (every thread) is pinned to the first CPU this
benchmark may use and smtp-source to the second, so a server's msgs/s is what
one core of its own gives it: the question a user with remote clients asks.
The servers are the ones already running (same flags, warm), pinned for this
phase only and given back every CPU afterwards.  Never part of a target.
"""

from __future__ import annotations

import os
from dataclasses import replace

from measure import Workload, interleaved
from procs import log, process_tree
from servers import Server

#: The key of the samples of this run, beside the workload's own.
SUFFIX = "-split"


def cpus() -> tuple[set[int], set[int]] | None:
    """(the servers' CPU, the client's CPU): the first two this process may use; None with fewer."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None
    return {mine[0]}, {mine[1]}


def pin(server: Server, where: set[int]) -> int:
    """Pin every thread of the server's process tree to ``where``: the number of threads pinned.

    Threads come and go (Node's helpers, a replaced worker): one that is gone
    is skipped; a process started later inherits its parent's CPUs.
    """
    pinned = 0
    for tid in _threads(server):
        try:
            os.sched_setaffinity(tid, where)
            pinned += 1
        except OSError:
            pass  # gone meanwhile; one that stays unpinned is found by pinned_to()
    return pinned


def pinned_to(server: Server, where: set[int]) -> bool:
    """Whether every thread of the server's process tree may run on ``where`` only."""
    found = False
    for tid in _threads(server):
        try:
            if os.sched_getaffinity(tid) != where:
                return False
        except OSError:
            continue  # gone meanwhile
        found = True
    return found


def _threads(server: Server) -> list[int]:
    """Thread ids of every process of the server's tree."""
    tids = []
    for proc in process_tree(server.root):
        try:
            tids += [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        except OSError:
            continue
    return tids


def run(active: list[Server], wl: Workload, reps: int, timeout: float) -> Workload | None:
    """Run ``wl`` with the servers of its group pinned apart from the client: the workload it was
    recorded under (``wl.key + SUFFIX``, in each server's samples), or None when fewer than two CPUs.

    RuntimeError when a server could not be pinned (its figures would not be
    what the report says they are); the servers get every CPU back either way.
    """
    where = cpus()
    if where is None:
        log("split cores: fewer than two CPUs, not run")
        return None
    server_cpus, client_cpus = where
    everything = os.sched_getaffinity(0)
    split = replace(wl, key=wl.key + SUFFIX, title=wl.title + ", smtp-source on its own core")
    group = [s for s in active if s.group == wl.group and s.runs(wl.key)]
    if not group:
        return None
    try:
        for s in group:
            pin(s, server_cpus)
            if not pinned_to(s, server_cpus):
                raise RuntimeError(f"split cores: {s.label} could not be pinned to CPU {min(server_cpus)}")
        log(f"split cores: servers on CPU {min(server_cpus)}, smtp-source on CPU {min(client_cpus)}")
        interleaved(group, [wl], reps, timeout, client_cpus, SUFFIX)
    finally:
        for s in group:
            pin(s, everything)
    return split
