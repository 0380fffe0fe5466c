#!/usr/bin/env python3
"""Writes the protobuf seed inputs of frame_check and edge_message (run from fuzz/: python3 make_seeds.py).

Hand-encoded protobuf (no dependency): a RunBatch / EdgeMessage of valid frames of the shipped
model (shape [1, 8, 7, 7], 392 values) in each codec, so the fuzzer starts past the checks.
"""
import json
import struct

MODEL = json.load(open("../models/fashion-mnist-nested/manifest.json"))
SHAPE = [1] + MODEL["backbone"]["output_shape"][1:]
N = 1
for d in SHAPE[1:]:
    N *= d


def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def tensor(codec, data, scale=0.0, zero_point=0.0, shape=SHAPE):
    return (
        field(1, 0, varint(codec))
        + field(2, 2, b"".join(varint(d) for d in shape))
        + field(3, 2, data)
        + field(4, 5, struct.pack("<f", scale))
        + field(5, 5, struct.pack("<f", zero_point))
    )


TENSORS = [
    tensor(1, b"".join(struct.pack("<f", i / 100.0) for i in range(N))),
    tensor(2, b"".join(struct.pack("<e", i / 100.0) for i in range(N))),
    tensor(3, bytes(i % 256 for i in range(N)), scale=0.02, zero_point=12.0),
]


def run_batch(segments, tensors, model_hash=MODEL["content_hash"]):
    return (
        field(1, 0, varint(7))
        + field(2, 2, model_hash.encode())
        + b"".join(
            field(3, 2, field(1, 2, s.encode()) + field(2, 5, struct.pack("<f", 1.0)))
            for s in segments
        )
        + b"".join(field(4, 2, t) for t in tensors)
    )


ids = [s["id"] for s in MODEL["segments"]]
# flags 0xF8: every segment hosted, ids and hash as written.
open("seeds/frame_check/all-codecs", "wb").write(b"\xf8" + run_batch(ids, TENSORS))
# flags 0xFF: hash filled in, one-byte ids mapped to segments, empty shapes filled in.
short = [bytes([i]).decode() for i in range(len(ids))]
open("seeds/frame_check/flags", "wb").write(
    b"\xff" + run_batch(short, [tensor(1, bytes(4 * N), shape=[])], model_hash="")
)

frames = b"".join(
    field(1, 2, field(1, 0, varint(i)) + field(2, 2, t)) for i, t in enumerate(TENSORS)
)
open("seeds/edge_message/frames", "wb").write(b"\x00" + field(3, 2, frames))
open("seeds/edge_message/frame", "wb").write(
    b"\x00" + field(2, 2, field(1, 0, varint(1)) + field(2, 2, TENSORS[0]))
)
