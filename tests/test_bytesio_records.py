"""Safe loading admits ``io.BytesIO`` as a plain byte container -- and nothing more.

A ``BytesIO`` value pickles as ``NEWOBJ`` of an empty ``_io.BytesIO`` plus ``BUILD`` with
``(bytes, position, attribute dict)``. Each record below is hand-written, wrapped in the
``torch.save`` archive DCP stores, and given to ``check_object_record`` -- what our reader
runs on every object record before DCP's planner unpickles it (``torch.load``, as stock).
"""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
import torch

from dcp_datastates import CorruptCheckpointError, UnsafeCheckpointError
from dcp_datastates.safe_pickle import check_object_record


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _bytes(data: bytes) -> bytes:
    """Protocol 2's ``bytes``: ``_codecs.encode(str, 'latin1')``, as ``torch.save`` writes it."""
    return b"c_codecs\nencode\n" + _text(data.decode("latin1")) + _text("latin1") + b"\x86R"


def _int(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def _bytesio(initial: bytes, position: bytes, attributes: bytes = b"N") -> bytes:
    return b"\x80\x02c_io\nBytesIO\n)\x81" + initial + position + attributes + b"\x87b."


def _archive(pickle_bytes: bytes) -> bytes:
    """A ``torch.save`` archive of a BytesIO with its ``data.pkl`` replaced."""
    real = io.BytesIO()
    torch.save(io.BytesIO(b"abc"), real)
    source = zipfile.ZipFile(io.BytesIO(real.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in source.namelist():
            archive.writestr(name, pickle_bytes if name.endswith("data.pkl") else source.read(name))
    return out.getvalue()


def _loaded(pickle_bytes: bytes) -> io.BytesIO:
    payload = _archive(pickle_bytes)
    check_object_record(payload, "blob", "__0_1.distcp", 0)
    return torch.load(io.BytesIO(payload), weights_only=False)  # what DCP's planner does next


def test_a_bytesio_record_is_a_byte_container_even_far_out():
    plain = _loaded(_bytesio(_bytes(b"abc"), _int(1)))
    assert type(plain) is io.BytesIO and plain.getvalue() == b"abc" and plain.tell() == 1
    far = _loaded(_bytesio(_bytes(b"abc"), _int(2**62)))  # a position is a number, never an allocation
    assert far.getvalue() == b"abc" and far.tell() == 2**62 and far.read() == b""


HOSTILE = {
    "position beyond ssize_t": (_bytesio(_bytes(b"abc"), _int(2**70)), CorruptCheckpointError, "too large"),
    "negative position": (_bytesio(_bytes(b"abc"), _int(-1)), CorruptCheckpointError, "cannot be negative"),
    "a BytesIO inside a BytesIO": (
        _bytesio(b"c_io\nBytesIO\n)\x81" + _bytes(b"x") + b"K\x00N\x87b", _int(0)), CorruptCheckpointError, "bytes-like"),
    "text instead of bytes": (_bytesio(_text("abc"), _int(0)), CorruptCheckpointError, "bytes-like"),
    "a length claiming 2 GiB": (
        _bytesio(b"c_codecs\nencode\nX" + struct.pack("<I", 2**31 - 1) + b"abc", _int(0)), CorruptCheckpointError, "claims"),
    "a command in its attributes": (
        _bytesio(_bytes(b"abc"), _int(0), b"}" + _text("x") + b"cos\nsystem\ns"), UnsafeCheckpointError, "safe loading refuses"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_bytesio_records_are_refused_naming_the_key(case):
    data, error, why = HOSTILE[case]
    with pytest.raises(error, match=why) as caught:
        check_object_record(_archive(data), "blob", "__0_1.distcp", 0)
    assert "'blob'" in str(caught.value)


def test_attributes_on_a_bytesio_cannot_change_what_it_is():
    """An attribute dict in the record (no real BytesIO carries one) can shadow a method name with plain data,
    no more: the result is a BytesIO whose own bytes are intact -- or, if the scanner refuses it, a typed error."""
    record = _bytesio(_bytes(b"abc"), _int(0), b"}" + _text("getvalue") + _text("not the bytes") + b"s")
    try:
        loaded = _loaded(record)
    except (CorruptCheckpointError, UnsafeCheckpointError) as exc:
        assert "'blob'" in str(exc)
        return
    assert type(loaded) is io.BytesIO and io.BytesIO.getvalue(loaded) == b"abc"
    assert loaded.__dict__ == {"getvalue": "not the bytes"}  # plain data, as stock's unpickler would give it
