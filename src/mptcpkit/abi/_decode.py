"""Decoding fixed-layout kernel structs that grow with kernel versions.

The kernel copies `min(user buffer, its struct size)` bytes and reports the length, so
a struct is decoded field by field: a field that does not fit in the bytes the kernel
returned belongs to a newer kernel and decodes as None.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

Field = tuple[str, str, int]  # (name, struct format without byte order, offset)


def decode_fields(data: bytes, fields: Sequence[Field]) -> dict[str, int | None]:
    """Little-endian fields at fixed offsets; those past the end of `data` are None."""
    out: dict[str, int | None] = {}
    size = len(data)
    for name, fmt, offset in fields:
        width = struct.calcsize("<" + fmt)
        out[name] = (
            struct.unpack_from("<" + fmt, data, offset)[0] if offset + width <= size else None
        )
    return out


def require_length(data: bytes, minimum: int, what: str) -> None:
    if len(data) < minimum:
        raise ValueError(f"{what}: {len(data)} bytes is shorter than the {minimum}-byte minimum")
