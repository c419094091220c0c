"""The kernel's MPTCP ABI: constants and struct codecs, as pure functions.

Nothing in this package performs I/O; every layer above builds on it.
"""
