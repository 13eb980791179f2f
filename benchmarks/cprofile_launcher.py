"""prefork-esmtp's CLI with every worker's serve loop under cProfile (benchmark use only).

    PREFORK_ESMTP_CPROFILE_DIR=/tmp/prof python benchmarks/cprofile_launcher.py start ...

Wraps ``Worker.run`` (nothing in the package is changed on disk) so that each
worker profiles itself from its first wait to its exit and writes
``worker-PID.pstats`` into the directory.  The profiler's clock is
``time.process_time`` (``PREFORK_ESMTP_CPROFILE_CLOCK=cpu``, the default): CPU
time of the process, user and kernel, so a worker blocked in epoll_wait or
recv costs nothing, and the CPU the kernel spends in a system call is charged
to the function that made it.  ``=wall`` uses cProfile's own cheap wall clock
instead.  Used by ``benchmarks/profiling.py``.
"""

from __future__ import annotations

import cProfile
import os
import sys
import time

from prefork_esmtp import worker as worker_module

OUT = os.environ.get("PREFORK_ESMTP_CPROFILE_DIR", ".")
#: "cpu" (default): time.process_time, exact CPU but a system call per profiler event;
#: "wall": cProfile's own clock, cheap, but blocking waits count (recv, epoll.poll)
CLOCK = os.environ.get("PREFORK_ESMTP_CPROFILE_CLOCK", "cpu")
_original_run = worker_module.Worker.run


def _profiled_run(self: worker_module.Worker) -> None:
    profiler = cProfile.Profile(time.process_time) if CLOCK == "cpu" else cProfile.Profile()
    profiler.enable()
    try:
        _original_run(self)
    finally:
        profiler.disable()
        profiler.dump_stats(os.path.join(OUT, f"worker-{os.getpid()}.pstats"))


worker_module.Worker.run = _profiled_run  # type: ignore[method-assign]

if __name__ == "__main__":
    from prefork_esmtp.cli import main

    sys.argv[0] = "prefork-esmtp"
    sys.exit(main())
