"""The file format of saved KV state: safetensors with a typed, versioned header.

A saved :class:`~streamsketch.kv.KeySelector` or
:class:`~streamsketch.kv.SketchCache` is one safetensors blob: the tensors
(flat names such as ``layers.3.keys``) and, in the safetensors metadata, a
format tag, a version, the kind of object and its configuration as JSON.
safetensors holds no code (unlike pickle), and it checks every tensor's
extent against the blob before it allocates anything. This module only
moves bytes; each class validates what it reads (``load_state_dict``).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

__all__ = ["FORMAT", "VERSION", "pack", "unpack"]

#: The format tag in every saved blob's metadata.
FORMAT = "streamsketch.kv"
#: The version written; readers accept this one.
VERSION = 1
# safetensors' own header limit: a longer one is refused before it is read.
_MAX_HEADER = 100_000_000


def pack(kind: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """One blob holding ``tensors`` (copied to contiguous CPU memory) and ``config`` as JSON."""
    from safetensors.torch import save

    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
    }
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return save(cpu, metadata=metadata)


def unpack(blob: Any, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The configuration and tensors of a blob written by :func:`pack` for ``kind``.

    Raises ``ValueError`` saying what is wrong for anything else: not bytes,
    a truncated or corrupted blob, another format, version or kind, a
    configuration that is not a JSON object.
    """
    if isinstance(blob, (bytearray, memoryview)):
        blob = bytes(blob)
    if not isinstance(blob, bytes):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    metadata = _metadata(blob)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} blob (format {metadata.get('format')!r})")
    if metadata.get("version") != str(VERSION):
        raise ValueError(f"unsupported {FORMAT} version {metadata.get('version')!r}")
    if metadata.get("kind") != kind:
        raise ValueError(f"blob holds a {metadata.get('kind')!r}, not a {kind!r}")
    try:
        config = json.loads(metadata.get("config", ""))
    except ValueError as exc:
        raise ValueError(f"blob's configuration is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError("blob's configuration must be a JSON object")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"blob's tensors are corrupted: {exc}") from exc
    return config, tensors


def _metadata(blob: bytes) -> dict[str, Any]:
    # safetensors' layout: an 8-byte little-endian header length, then a JSON header whose
    # "__metadata__" maps strings to strings.
    if len(blob) < 8:
        raise ValueError(f"blob is truncated: {len(blob)} bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(len(blob) - 8, _MAX_HEADER):
        raise ValueError(f"blob's header length {n} exceeds the blob ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"blob's header is not valid JSON: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ValueError("blob's header has no metadata: not a streamsketch blob")
    return metadata
