"""A recording handler that also records what the PROXY header told (the ``proxy`` session fact).

Its CONNECT, EOM and DISCONNECT records carry ``peer``, ``local`` and ``proxy`` (bytes
values as hex), so a test behind a load balancer sees which address the
handler was given.
"""

from __future__ import annotations

from typing import Any

from recorder import Recorder


def _plain(value: Any) -> Any:
    """JSON-friendly: bytes as hex, tuples as lists, dicts and lists recursively."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class ProxyRecorder(Recorder):
    def _record(self, hook: str, *args: object, raw: bytes | None = None) -> None:
        if hook in ("CONNECT", "EOM", "DISCONNECT"):
            args = (*args, {"peer": _plain(self.peer), "local": _plain(self.local),
                            "proxy": _plain(self.proxy), "tls": self.tls is not None})
        super()._record(hook, *args, raw=raw)
