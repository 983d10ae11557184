import struct
import zlib

import numpy as np
import pytest

from streamsketch import CountSketch, load
from streamsketch._serialization import dumps, loads


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_roundtrip_all_field_kinds():
    fields = {
        "none": None,
        "flag": True,
        "n": -7,
        "x": 2.5,
        "s": "héllo",
        "b": b"\x00\x01",
        "a32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a64": np.arange(4.0),
        "i": np.array([1, -2], np.int64),
        "u": np.array([3], np.uint64),
        "empty": np.zeros((0, 5)),
    }
    name, out = loads(dumps("Thing", fields))
    assert name == "Thing" and set(out) == set(fields)
    for k, v in fields.items():
        if isinstance(v, np.ndarray):
            assert out[k].dtype == v.dtype and np.array_equal(out[k], v)
            assert out[k].flags.writeable
        else:
            assert out[k] == v and type(out[k]) is type(v)


def test_every_truncation_and_bitflip_is_a_value_error():
    blob = CountSketch(3, 4, seed=0).extend(np.ones((5, 3))).to_bytes()
    for cut in range(len(blob)):
        with pytest.raises(ValueError):
            CountSketch.from_bytes(blob[:cut])
    rng = np.random.default_rng(0)
    for pos in rng.choice(len(blob), size=min(200, len(blob)), replace=False):
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            CountSketch.from_bytes(bytes(bad))


def test_inflated_array_size_refused_before_allocation():
    # A well-formed blob (valid checksum) whose array claims 10**12 elements.
    head = b"SSKT" + struct.pack("<H", 1) + struct.pack("<H", 5) + b"Thing" + struct.pack("<I", 1)
    field = struct.pack("<H", 1) + b"a" + bytes([6, 2, 1]) + struct.pack("<Q", 10**12)
    with pytest.raises(ValueError, match="needs 8000000000000 bytes"):
        loads(_recrc(head + field + b"\x00" * 64))


def test_wrong_class_version_and_garbage():
    blob = CountSketch(3, 4, seed=0).to_bytes()
    from streamsketch.linear.updater import LinearAttentionState

    with pytest.raises(ValueError, match="holds a CountSketch"):
        LinearAttentionState.from_bytes(blob)
    with pytest.raises(ValueError, match="bad magic"):
        load(b"XXXX" + blob[4:])
    bumped = bytearray(blob[:-4])
    bumped[4:6] = struct.pack("<H", 99)
    with pytest.raises(ValueError, match="format version 99"):
        load(_recrc(bytes(bumped)))
    with pytest.raises(TypeError, match="blob must be bytes"):
        load("not bytes")


def test_state_not_matching_params_is_refused():
    good = CountSketch(3, 4, seed=0)
    name, fields = loads(good.to_bytes())
    fields["array.SA"] = np.zeros((5, 3))
    with pytest.raises(ValueError, match="array 'SA' should be float64"):
        CountSketch.from_bytes(dumps(name, fields))
    fields["array.SA"] = np.full((4, 3), np.nan)
    with pytest.raises(ValueError, match="NaN or Inf"):
        CountSketch.from_bytes(dumps(name, fields))
    _, fields = loads(good.to_bytes())
    fields["param.sketch_size"] = 0
    with pytest.raises(ValueError, match="bad parameters"):
        CountSketch.from_bytes(dumps(name, fields))
    _, fields = loads(good.to_bytes())
    fields["scalar.n_seen"] = -1
    with pytest.raises(ValueError, match="non-negative"):
        CountSketch.from_bytes(dumps(name, fields))
    _, fields = loads(good.to_bytes())
    fields["extra.x"] = 1
    with pytest.raises(ValueError, match="unexpected field"):
        CountSketch.from_bytes(dumps(name, fields))


def test_no_pickle_in_package():
    import pathlib

    import streamsketch

    root = pathlib.Path(streamsketch.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
