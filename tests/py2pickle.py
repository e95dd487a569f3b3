"""Write pickles the way Python 2's cPickle did (protocol 2), for the REFER reader's tests.

The real ``refs(*.p)`` files were written by Python 2, where ``str`` is a byte string: it is
stored with the (SHORT_)BINSTRING opcodes, which Python 3 has no way to emit. Here ``bytes`` stands
for a Python 2 ``str`` and ``str`` for a Python 2 ``unicode``.
"""

from __future__ import annotations

import struct
from typing import Any


def _emit(value: Any, out: bytearray) -> None:
    if value is None:
        out += b"N"
    elif value is True or value is False:
        out += b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
    elif isinstance(value, int):
        out += b"J" + struct.pack("<i", value)  # BININT
    elif isinstance(value, float):
        out += b"G" + struct.pack(">d", value)  # BINFLOAT
    elif isinstance(value, bytes):
        if len(value) < 256:
            out += b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING
        else:
            out += b"T" + struct.pack("<i", len(value)) + value  # BINSTRING
    elif isinstance(value, str):
        data = value.encode("utf-8")
        out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE
    elif isinstance(value, list):
        out += b"]("  # EMPTY_LIST, MARK
        for item in value:
            _emit(item, out)
        out += b"e"  # APPENDS
    elif isinstance(value, dict):
        out += b"}("  # EMPTY_DICT, MARK
        for key, item in value.items():
            _emit(key, out)
            _emit(item, out)
        out += b"u"  # SETITEMS
    else:
        raise TypeError(f"no Python 2 encoding for {type(value).__name__}")


def python2_pickle(value: Any) -> bytes:
    out = bytearray(b"\x80\x02")  # PROTO 2
    _emit(value, out)
    return bytes(out + b".")  # STOP
