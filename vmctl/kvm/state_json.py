"""ctypes KVM structs <-> JSON values, field by field, so a saved vCPU stays readable.

A struct becomes a dict of its fields in declaration order; a nested struct a nested dict;
an array a list, except byte arrays, which become one hex string. Decoding is strict: a
missing, unknown or out-of-range field is a `StateError` naming its path (`regs.rip`), so a
damaged or foreign state file is refused instead of half-applied.
"""

from __future__ import annotations

import ctypes
from typing import Any

from ..errors import VmctlError


class StateError(VmctlError):
    """Saved machine state that does not fit the structure it should restore."""


def _is_byte_array(kind: Any) -> bool:  # kind: a ctypes type (reflection: Any)
    return issubclass(kind, ctypes.Array) and kind._type_ in (ctypes.c_uint8, ctypes.c_char)


def encode(value: Any) -> Any:
    """A ctypes struct, union-free array or scalar as a JSON value."""
    if isinstance(value, ctypes.Structure):
        return {name: encode(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, ctypes.Array):
        if _is_byte_array(type(value)):
            return bytes(value).hex()
        return [encode(item) for item in value]
    if isinstance(value, bytes):  # a c_char array read through its field
        return value.hex()
    return value


def decode(kind: Any, data: Any, path: str) -> Any:
    """Build a `kind` (struct, array or integer ctype) from `encode`'s output."""
    if issubclass(kind, ctypes.Structure):
        if not isinstance(data, dict):
            raise StateError(f"{path}: expected an object, found {type(data).__name__}")
        names = [name for name, *_ in kind._fields_]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise StateError(f"{path}.{unknown[0]}: unknown field")
        result = kind()
        for name, field_type, *_ in kind._fields_:
            if name not in data:
                raise StateError(f"{path}.{name}: missing")
            value = decode(field_type, data[name], f"{path}.{name}")
            if issubclass(field_type, (ctypes.Structure, ctypes.Array)):
                ctypes.memmove(ctypes.addressof(result) + getattr(kind, name).offset, ctypes.addressof(value),
                               ctypes.sizeof(field_type))
            else:
                setattr(result, name, value)
        return result
    if issubclass(kind, ctypes.Array):
        if _is_byte_array(kind):
            if not isinstance(data, str):
                raise StateError(f"{path}: expected a hex string")
            try:
                raw = bytes.fromhex(data)
            except ValueError:
                raise StateError(f"{path}: not a hex string") from None
            if len(raw) != kind._length_:
                raise StateError(f"{path}: {len(raw)} bytes, expected {kind._length_}")
            return kind.from_buffer_copy(raw)
        if not isinstance(data, list) or len(data) != kind._length_:
            raise StateError(f"{path}: expected a list of {kind._length_}")
        result = kind()
        for index, item in enumerate(data):
            value = decode(kind._type_, item, f"{path}[{index}]")
            if issubclass(kind._type_, (ctypes.Structure, ctypes.Array)):
                ctypes.memmove(ctypes.addressof(result) + index * ctypes.sizeof(kind._type_), ctypes.addressof(value),
                               ctypes.sizeof(kind._type_))
            else:
                result[index] = value
        return result
    return _integer(kind, data, path)


def _integer(kind: Any, data: Any, path: str) -> int:
    if not isinstance(data, int) or isinstance(data, bool):
        raise StateError(f"{path}: expected an integer, found {type(data).__name__}")
    bits = 8 * ctypes.sizeof(kind)
    signed = kind(-1).value == -1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= data <= high:
        raise StateError(f"{path}: {data} does not fit {bits} bits")
    return data


def to_hex(struct: ctypes.Structure) -> str:
    """A whole struct as one hex string (large opaque areas: the LAPIC page, XSAVE)."""
    return bytes(struct).hex()


def from_hex(kind: Any, data: Any, path: str, size: int | None = None) -> Any:
    if not isinstance(data, str):
        raise StateError(f"{path}: expected a hex string")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise StateError(f"{path}: not a hex string") from None
    expected = ctypes.sizeof(kind) if size is None else size
    if len(raw) != expected:
        raise StateError(f"{path}: {len(raw)} bytes, expected {expected}")
    return kind.from_buffer_copy(raw)
