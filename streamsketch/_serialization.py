"""A small, versioned, self-describing binary format for sketch state.

Layout (all integers little-endian)::

    magic        4 bytes   b"SSKT"
    version      u16       FORMAT_VERSION
    class name   u16 length + UTF-8
    n_fields     u32
    fields       n_fields times: u16 name length + UTF-8 name, u8 tag, payload
    crc32        u32       of every byte before it

Payloads by tag: ``none`` (empty), ``bool`` (u8 0/1), ``int`` (i64), ``float``
(f64), ``str`` (u32 length + UTF-8), ``bytes`` (u64 length + raw; used to nest
another sketch's blob), ``array`` (u8 dtype code, u8 ndim, ndim x u64 shape,
raw little-endian C-order data).

Nothing is ever unpickled. Every length is checked against the bytes that
remain *before* anything is allocated, so a blob that claims a huge array is
refused without allocating it, and any malformed input raises
:class:`ValueError`.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "MAGIC", "dumps", "loads", "peek_class_name"]

MAGIC = b"SSKT"
FORMAT_VERSION = 1

_TAG_NONE, _TAG_BOOL, _TAG_INT, _TAG_FLOAT, _TAG_STR, _TAG_BYTES, _TAG_ARRAY = range(7)

# Only plain numeric dtypes travel; codes are part of the format, never reorder.
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("<i8"),
    5: np.dtype("<u4"),
    6: np.dtype("<u8"),
    7: np.dtype("|u1"),
    8: np.dtype("|b1"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_MAX_NDIM = 8


def _encode_str(s: str, fmt: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack(fmt, len(raw)) + raw


def _encode_value(value: Any) -> bytes:
    if value is None:
        return bytes([_TAG_NONE])
    if isinstance(value, (bool, np.bool_)):
        return bytes([_TAG_BOOL, int(bool(value))])
    if isinstance(value, (int, np.integer)):
        return bytes([_TAG_INT]) + struct.pack("<q", int(value))
    if isinstance(value, (float, np.floating)):
        return bytes([_TAG_FLOAT]) + struct.pack("<d", float(value))
    if isinstance(value, str):
        return bytes([_TAG_STR]) + _encode_str(value, "<I")
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return bytes([_TAG_BYTES]) + struct.pack("<Q", len(raw)) + raw
    if isinstance(value, np.ndarray):
        dt = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        dt = np.dtype(dt.str.replace("=", "<"))
        if dt not in _CODES:
            raise TypeError(f"cannot serialise arrays of dtype {value.dtype}")
        if value.ndim > _MAX_NDIM:
            raise TypeError(f"cannot serialise arrays with more than {_MAX_NDIM} dimensions")
        head = bytes([_TAG_ARRAY, _CODES[dt], value.ndim])
        head += struct.pack(f"<{value.ndim}Q", *value.shape)
        return head + np.ascontiguousarray(value, dtype=dt).tobytes()
    raise TypeError(f"cannot serialise a value of type {type(value).__name__}")


def dumps(class_name: str, fields: dict[str, Any]) -> bytes:
    """Encode ``fields`` (name -> value) for the sketch class ``class_name``."""
    parts = [MAGIC, struct.pack("<H", FORMAT_VERSION), _encode_str(class_name, "<H")]
    parts.append(struct.pack("<I", len(fields)))
    for name, value in fields.items():
        parts.append(_encode_str(name, "<H"))
        parts.append(_encode_value(value))
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise ValueError(
                f"corrupt sketch bytes: {what} needs {n} bytes, {len(self.data) - self.pos} remain"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def text(self, fmt: str, what: str) -> str:
        (n,) = self.unpack(fmt, what + " length")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"corrupt sketch bytes: {what} is not valid UTF-8") from None


def _check_envelope(blob: Any) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    data = bytes(blob)
    if len(data) < len(MAGIC) + 2 + 4:
        raise ValueError("corrupt sketch bytes: too short to hold a sketch")
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not streamsketch bytes: bad magic number")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise ValueError("corrupt sketch bytes: checksum mismatch (truncated or altered)")
    (version,) = struct.unpack("<H", data[len(MAGIC) : len(MAGIC) + 2])
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported sketch format version {version} (this build reads {FORMAT_VERSION})"
        )
    return data[:-4]


def peek_class_name(blob: Any) -> str:
    """The class name stored in ``blob`` (the envelope is fully checked)."""
    reader = _Reader(_check_envelope(blob))
    reader.take(len(MAGIC) + 2, "header")
    return reader.text("<H", "class name")


def _read_value(reader: _Reader, name: str) -> Any:
    (tag,) = reader.unpack("<B", f"tag of {name!r}")
    if tag == _TAG_NONE:
        return None
    if tag == _TAG_BOOL:
        (b,) = reader.unpack("<B", name)
        if b not in (0, 1):
            raise ValueError(f"corrupt sketch bytes: field {name!r} is not a bool")
        return bool(b)
    if tag == _TAG_INT:
        return int(reader.unpack("<q", name)[0])
    if tag == _TAG_FLOAT:
        return float(reader.unpack("<d", name)[0])
    if tag == _TAG_STR:
        return reader.text("<I", name)
    if tag == _TAG_BYTES:
        (n,) = reader.unpack("<Q", f"length of {name!r}")
        return reader.take(n, name)
    if tag == _TAG_ARRAY:
        code, ndim = reader.unpack("<BB", f"header of array {name!r}")
        if code not in _DTYPES:
            raise ValueError(f"corrupt sketch bytes: array {name!r} has unknown dtype code {code}")
        if ndim > _MAX_NDIM:
            raise ValueError(f"corrupt sketch bytes: array {name!r} has {ndim} dimensions")
        shape = reader.unpack(f"<{ndim}Q", f"shape of array {name!r}")
        dt = _DTYPES[code]
        # Python ints do not overflow, so a forged shape cannot wrap around the
        # size check below: the array is refused before any allocation.
        n_bytes = dt.itemsize
        for s in shape:
            n_bytes *= int(s)
        raw = reader.take(n_bytes, f"data of array {name!r}")
        arr = np.frombuffer(raw, dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
        return arr
    raise ValueError(f"corrupt sketch bytes: field {name!r} has unknown tag {tag}")


def loads(blob: Any) -> tuple[str, dict[str, Any]]:
    """Decode a blob made by :func:`dumps`; returns ``(class_name, fields)``.

    Raises
    ------
    TypeError
        ``blob`` is not bytes-like.
    ValueError
        Anything about the content is wrong: magic, version, checksum, lengths,
        tags, dtypes, duplicate fields or trailing bytes.
    """
    reader = _Reader(_check_envelope(blob))
    reader.take(len(MAGIC) + 2, "header")
    class_name = reader.text("<H", "class name")
    (n_fields,) = reader.unpack("<I", "field count")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        name = reader.text("<H", "field name")
        if name in fields:
            raise ValueError(f"corrupt sketch bytes: field {name!r} appears twice")
        fields[name] = _read_value(reader, name)
    if reader.pos != len(reader.data):
        raise ValueError("corrupt sketch bytes: trailing data after the last field")
    return class_name, fields
