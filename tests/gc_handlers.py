"""A handler that tells, in its NOOP reply, the worker's garbage-collection threshold."""

from __future__ import annotations

import gc

from prefork_esmtp import ESMTPHandler


class TellsGcThreshold(ESMTPHandler):
    """NOOP answers ``250 gc threshold N`` with the youngest generation's threshold."""

    def NOOP(self):
        return 250, f"gc threshold {gc.get_threshold()[0]}"
