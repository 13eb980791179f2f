"""prefork-esmtp: an ESMTP server framework with the process model of Apache's prefork MPM.

Subclass :class:`ESMTPHandler`, override the SMTP hooks you care about, and run
``prefork-esmtp start --handler mymodule:MyServer``.
"""

__version__ = "0.1.0"

from prefork_esmtp.handler import ESMTPHandler, HandlerConfigError  # noqa: E402  (the public face)

__all__ = ["ESMTPHandler", "HandlerConfigError", "__version__"]
