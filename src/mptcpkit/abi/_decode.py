"""Decoding fixed-layout kernel structs that grow with kernel versions.

The kernel copies `min(user buffer, its struct size)` bytes and reports the length, so
a struct is decoded by the length returned: a field that does not fit belongs to a newer
kernel and decodes as None. One compiled `struct.Struct` per length seen keeps decoding
to a single C call.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Sequence


Field = tuple[str, str, int]  # (name, struct format without byte order, offset)


class Layout:
    """Little-endian fields at fixed offsets, in offset order."""

    def __init__(self, fields: Sequence[Field]) -> None:
        offsets = [offset for _, _, offset in fields]
        if offsets != sorted(offsets):
            raise ValueError("fields must be listed in offset order")
        self.fields = tuple(fields)
        self._plans: dict[int, tuple[struct.Struct, tuple[None, ...]]] = {}

    def _compile(self, size: int) -> tuple[struct.Struct, tuple[None, ...]]:
        fmt, at, fitted = "<", 0, 0
        for _, code, offset in self.fields:
            width = struct.calcsize("<" + code)
            if offset + width > size:
                break
            fmt += "x" * (offset - at) + code
            at = offset + width
            fitted += 1
        plan = (struct.Struct(fmt), (None,) * (len(self.fields) - fitted))
        self._plans[size] = plan
        return plan

    def unpack(self, data: bytes, size: int) -> tuple[int | None, ...]:
        """The field values of `data[:size]`, None for fields beyond it."""
        plan = self._plans.get(size) or self._compile(size)
        return plan[0].unpack_from(data) + plan[1]


def require_length(data: bytes, minimum: int, what: str) -> None:
    if len(data) < minimum:
        raise ValueError(f"{what}: {len(data)} bytes is shorter than the {minimum}-byte minimum")
