"""aiosmtpd's Sink as a server for the benchmark: accept every message and discard it.

    python benchmarks/aiosmtpd_sink.py 127.0.0.1 PORT

One process, one asyncio loop (aiosmtpd's own model), the stock ``SMTP``
protocol with the ``Sink`` handler, whose DATA reply is aiosmtpd's default
``250 OK``.  Logging is kept at WARNING so that neither side pays for it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiosmtpd.handlers import Sink
from aiosmtpd.smtp import SMTP


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = Sink()

    def factory() -> SMTP:
        return SMTP(handler, hostname="aiosmtpd-sink", data_size_limit=64 * 1024 * 1024,
                    loop=loop)

    server = loop.run_until_complete(loop.create_server(factory, host=host, port=port,
                                                        backlog=256, reuse_address=True))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    print(f"aiosmtpd sink listening on {host}:{port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


if __name__ == "__main__":
    main()
