"""Exceptions of the socket layer. Both are OSErrors, so code that catches OSError
around socket calls keeps working; their messages say what failed and the way out."""

from __future__ import annotations


class MPTCPUnavailableError(OSError):
    """MPTCP was required (mptcp="require") but the kernel would not create the socket,
    or the peer did not agree to MPTCP (the connection fell back to TCP)."""


class TCPOnlyOptionError(OSError):
    """A TCP-only option was set on an MPTCP socket that can no longer become plain TCP."""
