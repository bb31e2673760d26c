"""Values as the Rust client stores them: MessagePack (maps with named fields, like ``rmp-serde``'s
``to_vec_named``), or bytes verbatim (``raw=True``, the Rust ``Raw``); values of at least
``compress_min_size`` bytes travel as the tiercache lz4 frame (u32 LE original length + one lz4 block),
written with ``ENCODING lz4`` and read back with ``ENCODED``."""

from __future__ import annotations

import struct
from typing import Any, Optional

import lz4.block
import msgpack

from ._errors import CodecError

MAX_ORIGINAL_LEN = 512 * 1024 * 1024


def encode(value: Any, raw: bool) -> bytes:
    if raw:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise CodecError(f"raw=True needs bytes, not {type(value).__name__}")
        return bytes(value)
    try:
        out: bytes = msgpack.packb(value, use_bin_type=True)
        return out
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode {type(value).__name__} as MessagePack: {e}") from e


def decode(data: bytes, raw: bool) -> Any:
    if raw:
        return data
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise CodecError(f"cannot decode MessagePack value: {e}") from e


def compress_if_worth(data: bytes, min_len: int) -> Optional[bytes]:
    """The lz4 frame of ``data`` when it is at least ``min_len`` bytes and the frame saves >= 10 %
    (the rule of tiercache-core's ``compress_if_worth``)."""
    n = len(data)
    if n < min_len or n == 0 or n > MAX_ORIGINAL_LEN:
        return None
    frame = struct.pack("<I", n) + lz4.block.compress(data, store_size=False)
    return frame if len(frame) * 10 <= n * 9 else None


def decompress(frame: bytes) -> bytes:
    if len(frame) < 4:
        raise CodecError("invalid lz4 frame header")
    (n,) = struct.unpack_from("<I", frame)
    if n > MAX_ORIGINAL_LEN:
        raise CodecError("lz4 frame announces more than 512 MiB")
    try:
        out: bytes = lz4.block.decompress(frame[4:], uncompressed_size=n)
    except Exception as e:
        raise CodecError(f"corrupt lz4 frame: {e}") from e
    if len(out) != n:
        raise CodecError("corrupt lz4 frame")
    return out


def read_encoded(encoding: Optional[bytes], stored: Optional[bytes]) -> bytes:
    if stored is None:
        raise CodecError("no value")
    if encoding == b"lz4":
        return decompress(stored)
    return stored
