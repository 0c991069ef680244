"""Seed inputs for the libFuzzer targets: one valid example of each record, so the
fuzzer starts past the magic checks. Layouts: csrc/transports/wire.hpp (frames,
hello), csrc/memory/region.cpp (descriptor), rc_connection.cpp (verbs QP info)."""
import os
import struct
import sys

FRAME = "<HBBIQQQQQQQQ"  # magic type flags reserved seq region offset length value sig_region sig_offset sig_add
MAGIC = 0x4C4E
PUT, ATOMIC, SEND, FLUSH, ACK, RESULT, CLOSE = 1, 3, 4, 5, 6, 7, 8
SIGNAL, ACK_REQUEST = 1, 2


def frame(kind, seq, region=0, offset=0, payload=b"", value=0, flags=0, sig=(0, 0, 0)):
    return struct.pack(FRAME, MAGIC, kind, flags, 0, seq, region, offset, len(payload), value, *sig) + payload


def chunked(data: bytes, size: int = 40) -> bytes:
    # fuzz_stream_frames reads a length byte before each chunk.
    out = bytearray()
    for i in range(0, len(data), size):
        part = data[i:i + size]
        out += bytes([len(part) - 1]) + part
    return bytes(out)


def main(root: str) -> None:
    seeds = {
        "fuzz_stream_frames": {
            "put-signal": chunked(frame(PUT, 1, 1, 64, b"x" * 100, flags=SIGNAL | ACK_REQUEST, sig=(3, 0, 1))),
            "atomic-send-flush": chunked(frame(ATOMIC, 1, 3, 0, value=5) + frame(SEND, 2, payload=b"hello!!!")
                                         + frame(FLUSH, 3)),
            "acks-close": chunked(frame(ACK, 1, value=7) + frame(RESULT, 2, value=9) + frame(CLOSE, 3, payload=b"bye")),
        },
        "fuzz_hello": {
            "valid": struct.pack("<QIiQQ", 0x4C414D494E41312E, 1, 2, 0x1122334455667788, 0x99AABBCCDDEEFF00)
            + b"ln/group/0-2".ljust(96, b"\0"),
        },
        "fuzz_region_descriptor": {
            # magic version kind owner access group id addr size rkey pid host fd shared_offset
            "host": struct.pack("<IHHII", 0x4C4E5244, 1, 0, 1, 0xF).ljust(80, b"\0"),
        },
        "fuzz_verbs_endpoint_info": {
            "info": struct.pack("<IIIIHBB", 0x4C4E5651, 1, 17, 99, 1, 5, 2) + bytes(16)
            + struct.pack("<IIQIQQ", 64, 65536, 0x1000, 7, 1, 2),
        },
    }
    for target, files in seeds.items():
        d = os.path.join(root, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, "seed-" + name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main(sys.argv[1])
