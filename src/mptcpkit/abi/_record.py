"""Frozen, slotted record classes, without the `dataclasses` module.

`@record` does what `@dataclass(frozen=True, slots=True)` does for the plain classes
of the socket layer (fields with optional defaults, __init__, __repr__, __eq__,
__hash__, __match_args__, no assignment, pickling), but `dataclasses` imports
`inspect`, `ast`, `dis` and `tokenize`: more than a third of `import mptcpkit` before
this module (measured in benchmarks/core_bench.py). Type checkers read it as a
dataclass (PEP 681).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    _C = TypeVar("_C", bound=type)


else:

    def dataclass_transform(**_: object) -> Callable[[_C], _C]:
        return lambda decorator: decorator


def _frozen(self: object, name: str, value: object = None) -> None:
    raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")


@dataclass_transform(frozen_default=True)
def record(cls: _C) -> _C:
    """Make `cls` a frozen record of its annotated fields, in order."""
    names = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063 - no inspect
    defaults = [cls.__dict__[name] for name in names if name in cls.__dict__]
    first_default = len(names) - len(defaults)
    if any(name in cls.__dict__ for name in names[:first_default]):
        raise TypeError(f"{cls.__name__}: a field without a default follows one with")
    params = ", ".join(
        name if i < first_default else f"{name}=None" for i, name in enumerate(names)
    )
    body = "".join(f"    _set(self, {name!r}, {name})\n" for name in names) or "    pass\n"
    scope: dict[str, Any] = {"_set": object.__setattr__}
    exec(f"def __init__(self, {params}):\n{body}", scope)
    init = scope["__init__"]
    init.__defaults__ = tuple(defaults) or None
    init.__qualname__ = f"{cls.__qualname__}.__init__"

    def values(self: Any) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in names)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return values(self) == values(other)

    def __hash__(self: Any) -> int:
        return hash(values(self))

    def __getstate__(self: Any) -> tuple[Any, ...]:
        return values(self)

    def __setstate__(self: Any, state: tuple[Any, ...]) -> None:
        for name, value in zip(names, state, strict=True):
            object.__setattr__(self, name, value)

    namespace = {k: v for k, v in cls.__dict__.items() if k not in names}
    namespace.pop("__dict__", None)
    namespace.pop("__weakref__", None)
    namespace.update(
        __slots__=names,
        __match_args__=names,
        __init__=init,
        __repr__=__repr__,
        __eq__=__eq__,
        __hash__=__hash__,
        __setattr__=_frozen,
        __delattr__=_frozen,
        __getstate__=__getstate__,
        __setstate__=__setstate__,
    )
    new = type(cls)(cls.__name__, cls.__bases__, namespace)
    new.__qualname__ = cls.__qualname__
    return new
