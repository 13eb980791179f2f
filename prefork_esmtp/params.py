"""ESMTP parameters of MAIL and RCPT: which we take, and what makes a value valid.

SIZE and BODY (RFC 1870, 6152, 3030), SMTPUTF8 (RFC 6531), AUTH (RFC 4954)
and the DSN parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461).  Values stay
as the client wrote them in ``mail_params``/``rcpt_params``; a bad one gets
the reply returned here.
"""

from __future__ import annotations

import re

from prefork_esmtp import replies as R
from prefork_esmtp.addresses import AddressError, decode_xtext

_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def _xtext_ok(value: str) -> bool:
    try:
        decode_xtext(value)
    except AddressError:
        return False
    return True


def check_mail(params: dict[str, str | None], max_size: int, bdat_offered: bool) -> R.Reply | None:
    """The reply owed to MAIL for its parameters, or None when they are all fine."""
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                return R.BAD_SIZE.format(value)
            if int(value) > max_size:
                return R.SIZE_EXCEEDED.format(max_size)
        elif key == "BODY":
            allowed = ("7BIT", "8BITMIME", "BINARYMIME") if bdat_offered else ("7BIT", "8BITMIME")
            if value is None or value.upper() not in allowed:
                return R.BAD_BODY.format(value)
        elif key == "SMTPUTF8":
            if value is not None:
                return R.BAD_SMTPUTF8
        elif key == "AUTH":
            if value is None or (value != "<>" and not _xtext_ok(value)):
                return R.BAD_PARAMETER.format(key, value)
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return R.BAD_PARAMETER.format(key, value)
        elif key == "ENVID":
            if value is None or len(value) > 100 or not _xtext_ok(value):
                return R.BAD_PARAMETER.format(key, value)
        else:
            return R.UNSUPPORTED_PARAMETER.format(key)
    return None


def check_rcpt(params: dict[str, str | None]) -> R.Reply | None:
    """The reply owed to RCPT for its parameters, or None when they are all fine."""
    for key, value in params.items():
        if key == "NOTIFY":
            words = {w.upper() for w in (value or "").split(",")}
            if not value or not (words == {"NEVER"} or words <= _NOTIFY) or "" in words:
                return R.BAD_PARAMETER.format(key, value)
        elif key == "ORCPT":
            addr_type, sep, address = (value or "").partition(";")
            if not sep or not _ADDR_TYPE.fullmatch(addr_type) or not address or len(value) > 500 \
                    or not _xtext_ok(address):
                return R.BAD_PARAMETER.format(key, value)
        else:
            return R.UNSUPPORTED_PARAMETER.format(key)
    return None
