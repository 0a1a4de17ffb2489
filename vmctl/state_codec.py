"""Device state dataclasses <-> JSON, strictly: what a snapshot file stores for each device.

Fields may be int, bool, str, bytes (stored as hex), `X | None`, list[...] and nested state
dataclasses. Decoding checks every field's type and names the first bad one by its path
(`devices[1].queues[0].last_avail`), so a damaged file is refused in one line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import VmctlError

T = TypeVar("T")


class StateFieldError(VmctlError):
    """A saved device state that does not match its dataclass."""


def state_to_json(state: Any) -> Any:
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: state_to_json(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if isinstance(state, (bytes, bytearray)):
        return bytes(state).hex()
    if isinstance(state, (list, tuple)):
        return [state_to_json(item) for item in state]
    return state


def state_from_json(kind: type[T], data: Any, path: str) -> T:
    """Build the dataclass `kind` from `state_to_json`'s output, checking every field."""
    return _decode(kind, data, path)  # type: ignore[no-any-return]


def _decode(kind: Any, data: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _decode(inner, data, path)
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(data, list):
            raise StateFieldError(f"{path}: expected a list")
        return [_decode(inner, item, f"{path}[{index}]") for index, item in enumerate(data)]
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, dict):
            raise StateFieldError(f"{path}: expected an object")
        hints = typing.get_type_hints(kind)
        names = [f.name for f in dataclasses.fields(kind)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise StateFieldError(f"{path}.{unknown[0]}: unknown field")
        values = {}
        for name in names:
            if name not in data:
                raise StateFieldError(f"{path}.{name}: missing")
            values[name] = _decode(hints[name], data[name], f"{path}.{name}")
        return kind(**values)  # type: ignore[operator]  # a dataclass type, known by is_dataclass
    if kind is bool:
        if not isinstance(data, bool):
            raise StateFieldError(f"{path}: expected true or false")
        return data
    if kind is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise StateFieldError(f"{path}: expected an integer")
        return data
    if kind is str:
        if not isinstance(data, str):
            raise StateFieldError(f"{path}: expected a string")
        return data
    if kind is bytes:
        if not isinstance(data, str):
            raise StateFieldError(f"{path}: expected a hex string")
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise StateFieldError(f"{path}: not a hex string") from None
    if kind is dict or typing.get_origin(kind) is dict:
        if not isinstance(data, dict):
            raise StateFieldError(f"{path}: expected an object")
        return data
    raise TypeError(f"{path}: unsupported state field type {kind!r}")
