"""GGUF's quantised block formats (llama.cpp ggml-common.h; gguf-py quants.py), decoded in
numpy, block by block, into the runtime's weight types.

Shape glossary: nb blocks, k outputs per block of one part. A GGUF tensor row of ne0 values is
a run of blocks of `block` values stored in `size` bytes each; the reader reads a part's byte
spans of only the blocks a slice touches (gguf_source.Source.part).

How each type loads (`loads_as`), all exact (the file's own values):
  int8    QuantizedWeight8bit / QuantizedEmbedding: Q8_0 (q, fp16 d), Q5_0 (q - 16, fp16 d),
          Q6_K (q - 32, float32 d * sc per 16), and with mins (int8_mins.py) Q5_1 (q, fp16 d
          and m) and Q5_K (q, float32 d * sc and -dmin * m per 32).
  int4    QuantizedWeight4bit: in groups of 32 Q4_0 (symmetric, fp16 d), Q4_1 (fp16 d and m),
          Q4_K (float32 d * sc and -dmin * m per 32: products of an fp16 and a 6-bit integer,
          exact in float32); in groups of 16 Q3_K (symmetric: codes q + 4, float32
          d * (sc - 32)) and Q2_K (codes q 0..3, float32 d * sc and -dmin * m). Where they load
          as int8 (a table; a stack beside other types) their `values`: Q4_0 q - 8, Q3_K q - 4,
          Q4_1, Q4_K and Q2_K q with their mins.
Every part also decodes to `floats`: float32 values computed as gguf-py computes them, so a
parameter the model keeps float (the MoE router) holds the file's own dequantisation.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from runtime import host_copies


QK_K = 256  # values per K-quant super-block


class Part(NamedTuple):
    spans: tuple  # (lo, hi) byte ranges of each block, read and concatenated
    per_block: int  # k: outputs per block
    dtype: np.dtype
    decode: Callable  # uint8 [..., nb, span bytes] -> [..., nb, k]


class BlockType(NamedTuple):
    block: int  # values per block
    size: int  # bytes per block
    loads_as: str  # "int8" or "int4"
    group: int  # values per scale of the loaded weight (int8 / int4)
    parts: dict  # name -> Part: values, scales (mins) as int8; packed, scales, mins as int4; floats


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes [..., nb, 2] -> float32 [..., nb, 1] (little-endian fp16)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> codes [..., 2n]: all low nibbles, then all high nibbles."""
    return np.concatenate([raw & 15, raw >> 4], axis=-1)


def _pack(codes: np.ndarray, group: int = 32) -> np.ndarray:
    """Codes [..., nb, m * group] -> packed [..., nb, m * group/2] in quant4's order per group
    (byte j of a group: value j low, value j + group/2 high)."""
    groups = codes.reshape(*codes.shape[:-1], -1, group)
    half = group // 2
    return (groups[..., :half] | (groups[..., half:] << 4)).reshape(*codes.shape[:-1], -1)


def _scale_min(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K-quant 12-byte scales [..., nb, 12] -> (sc, m) 6-bit each, [..., nb, 8] float32:
    bytes 0-3 / 4-7 hold sc / m of sub-blocks 0-3 in their low 6 bits; sub-blocks 4-7 take
    the nibbles of bytes 8-11 with the top 2 bits of bytes 0-3 / 4-7 above them."""
    a, b, c = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    m = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K low nibbles: qs [..., nb, 128] -> [..., nb, 256]; bytes 32c..32c+31 hold
    values 64c..64c+31 low and 64c+32.. high."""
    return _nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).reshape(*qs.shape[:-1], QK_K)


def _per_sub_block(values: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """values [..., nb, n] times factors [..., nb, g], each factor over n / g values."""
    g = factors.shape[-1]
    return (values.reshape(*values.shape[:-1], g, -1) * factors[..., None]).reshape(values.shape)


def _q8_0_values(raw):
    return np.ascontiguousarray(raw).view(np.int8)


def _q4_0_values(raw):
    return _nibbles(raw).astype(np.int8) - np.int8(8)


def _q5_high(qh_bytes: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 fifth bits: 4 bytes (a little-endian uint32, bit i for value i) -> [.., 32]."""
    return np.unpackbits(np.ascontiguousarray(qh_bytes), axis=-1, bitorder="little")


def _q5_0_values(raw):  # d | qh | qs, without d
    return (_nibbles(raw[..., 4:]) | (_q5_high(raw[..., :4]) << 4)).astype(np.int8) - np.int8(16)


def _q5_1_codes(raw):  # qh | qs
    return _nibbles(raw[..., 4:]) | (_q5_high(raw[..., :4]) << 4)


def _q5_1_floats(raw):
    d, m = _f16(raw[..., 0:2]), _f16(raw[..., 2:4])
    return d * _q5_1_codes(raw[..., 4:]).astype(np.float32) + m


def _q4_1_floats(raw):
    return _f16(raw[..., 0:2]) * _nibbles(raw[..., 4:]).astype(np.float32) + _f16(raw[..., 2:4])


def _q4_k_scales(raw):  # d | 12 scale bytes (the same in C++ where built: host_copies.py)
    host = host_copies.k_sub_scales(raw, mins=False)
    return _f16(raw[..., 0:2]) * _scale_min(raw[..., 2:14])[0] if host is None else host


def _q4_k_mins(raw):  # dmin | 12 scale bytes: the value is d*sc*q - dmin*m
    host = host_copies.k_sub_scales(raw, mins=True)
    return -(_f16(raw[..., 0:2]) * _scale_min(raw[..., 2:14])[1]) if host is None else host


def _q4_k_packed(qs):  # qs 128 (the same in C++ where built)
    host = host_copies.q4_k_packed(qs)
    return _pack(_k_codes(qs)) if host is None else host


def _k_floats(raw, q: np.ndarray):
    """d * sc * q - dmin * m per 32-value sub-block, in gguf-py's order of operations."""
    scales, dmin_m = _q4_k_scales(raw[..., [0, 1, *range(4, 16)]]), \
        -_q4_k_mins(raw[..., 2:16])
    return _per_sub_block(q.astype(np.float32), scales) - np.repeat(dmin_m, 32, axis=-1)


def _q5_k_codes(raw):  # qh 32 | qs 128 (the same in C++ where built: host_copies.py)
    host = host_copies.q5_k_codes(raw)
    if host is not None:
        return host
    high = raw[..., :32]
    bits = np.stack([(high >> k) & 1 for k in range(8)], axis=-2)  # [..., nb, 8, 32]
    return _k_codes(raw[..., 32:]) | (bits.reshape(*raw.shape[:-1], QK_K) << 4)


def _q5_k_floats(raw):  # d | dmin | scales 12 | qh 32 | qs 128
    return _k_floats(raw, _q5_k_codes(raw[..., 16:]))


def _as_int8(codes):
    return lambda raw: codes(raw).astype(np.int8)


def _q2_k_codes(raw):  # qs 64: byte 32h + j holds values 128h + 32s + j in bits 2s, 2s + 1
    qs = raw.reshape(*raw.shape[:-1], 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return ((qs >> shifts) & 3).reshape(*raw.shape[:-1], QK_K)


def _q2_k_scales(raw):  # d | 16 scale bytes (sc in the low nibbles)
    return _f16(raw[..., 0:2]) * (raw[..., 2:18] & 15).astype(np.float32)


def _q2_k_mins(raw):  # dmin | 16 scale bytes (m in the high nibbles): the value is d*sc*q - dmin*m
    return -(_f16(raw[..., 0:2]) * (raw[..., 2:18] >> 4).astype(np.float32))


def _q2_k_floats(raw):  # scales 16 | qs 64 | d | dmin, in gguf-py's order of operations
    scale = _q2_k_scales(raw[..., [80, 81, *range(16)]])
    dmin_m = -_q2_k_mins(raw[..., [82, 83, *range(16)]])
    q = _q2_k_codes(raw[..., 16:80]).astype(np.float32)
    return _per_sub_block(q, scale) - np.repeat(dmin_m, 16, axis=-1)


def _q3_k_values(raw):  # hmask 32 | qs 64: q = low 2 bits - 4 where the hmask bit is clear
    low = _q2_k_codes(raw[..., 32:96]).astype(np.int8)
    hmask = raw[..., :32].reshape(*raw.shape[:-1], 1, 32)
    high = ((hmask >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(
        *raw.shape[:-1], QK_K)
    return low - ((1 - high.astype(np.int8)) << 2)


def _q3_k_scales(raw):  # 12 scale bytes | d: 6-bit sc (low 4 bits, then 2 high bits), sc - 32
    low, high = raw[..., :8], raw[..., 8:12]
    low = np.concatenate([low & 15, low >> 4], axis=-1)  # sub-blocks 0-7, then 8-15
    high = np.concatenate([(high >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    sc = (low | (high << 4)).astype(np.float32) - 32
    return _f16(raw[..., 12:14]) * sc


def _q6_k_values(raw):  # ql 128 | qh 64 (the same in C++ where built: host_copies.py)
    host = host_copies.q6_k_values(raw)
    if host is not None:
        return host
    low = _nibbles(raw[..., :128].reshape(*raw.shape[:-1], 2, 64))  # [..., nb, 2, 128]
    qh = raw[..., 128:192].reshape(*raw.shape[:-1], 2, 32)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)  # [..., nb, 2, 128]
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(*raw.shape[:-1], QK_K)


def _q6_k_scales(raw):  # 16 int8 sc | fp16 d
    sc = np.ascontiguousarray(raw[..., :16]).view(np.int8).astype(np.float32)
    return _f16(raw[..., 16:18]) * sc


def _int8_floats(values, scales, spans):
    """An int8 type's float32 values from its own two parts (q * d, as gguf-py); spans: the
    slices of a whole block that values and scales decode."""
    return lambda raw: _per_sub_block(values(raw[..., spans[0]]).astype(np.float32),
                                      scales(raw[..., spans[1]]))


F16, F32, I8, U8 = (np.dtype(t) for t in (np.float16, np.float32, np.int8, np.uint8))
K_SCALES = Part(((0, 2), (4, 16)), 8, F32, _q4_k_scales)  # Q4_K and Q5_K: d * sc per 32
K_MINS = Part(((2, 16),), 8, F32, _q4_k_mins)  # -dmin * m per 32


def _fp16(raw):
    return np.ascontiguousarray(raw).view(np.float16)


def _same(raw):
    return np.ascontiguousarray(raw)


def _whole(size, per_block, decode) -> Part:
    return Part(((0, size),), per_block, F32, decode)


TYPES = {
    "Q8_0": BlockType(32, 34, "int8", 32, {
        "values": Part(((2, 34),), 32, I8, _q8_0_values),
        "scales": Part(((0, 2),), 1, F16, _fp16),
        "floats": _whole(34, 32, _int8_floats(_q8_0_values, _f16, (slice(2, 34),
                                                                     slice(0, 2))))}),
    "Q5_0": BlockType(32, 22, "int8", 32, {
        "values": Part(((2, 22),), 32, I8, _q5_0_values),
        "scales": Part(((0, 2),), 1, F16, _fp16),
        "floats": _whole(22, 32, _int8_floats(_q5_0_values, _f16, (slice(2, 22),
                                                                     slice(0, 2))))}),
    "Q6_K": BlockType(QK_K, 210, "int8", 16, {
        "values": Part(((0, 192),), QK_K, I8, _q6_k_values),
        "scales": Part(((192, 210),), 16, F32, _q6_k_scales),
        "floats": _whole(210, QK_K, _int8_floats(_q6_k_values, _q6_k_scales,
                                                 (slice(0, 192), slice(192, 210))))}),
    "Q4_0": BlockType(32, 18, "int4", 32, {
        "packed": Part(((2, 18),), 16, U8, _same),
        "scales": Part(((0, 2),), 1, F16, _fp16),
        "values": Part(((2, 18),), 32, I8, _q4_0_values),  # a table: int8, exact
        "floats": _whole(18, 32, _int8_floats(_q4_0_values, _f16, (slice(2, 18),
                                                                     slice(0, 2))))}),
    "Q4_1": BlockType(32, 20, "int4", 32, {
        "packed": Part(((4, 20),), 16, U8, _same),
        "scales": Part(((0, 2),), 1, F16, _fp16),
        "mins": Part(((2, 4),), 1, F16, _fp16),
        "values": Part(((4, 20),), 32, I8, _as_int8(_nibbles)),
        "floats": _whole(20, 32, _q4_1_floats)}),
    "Q4_K": BlockType(QK_K, 144, "int4", 32, {
        "packed": Part(((16, 144),), 128, U8, _q4_k_packed),
        "scales": K_SCALES, "mins": K_MINS,
        "values": Part(((16, 144),), QK_K, I8, _as_int8(_k_codes)),
        "floats": _whole(144, QK_K, lambda raw: _k_floats(raw, _k_codes(raw[..., 16:])))}),
    "Q5_1": BlockType(32, 24, "int8", 32, {
        "values": Part(((4, 24),), 32, I8, _as_int8(_q5_1_codes)),
        "scales": Part(((0, 2),), 1, F16, _fp16),
        "mins": Part(((2, 4),), 1, F16, _fp16),
        "floats": _whole(24, 32, _q5_1_floats)}),
    "Q5_K": BlockType(QK_K, 176, "int8", 32, {
        "values": Part(((16, 176),), QK_K, I8, _as_int8(_q5_k_codes)),
        "scales": K_SCALES, "mins": K_MINS,
        "floats": _whole(176, QK_K, _q5_k_floats)}),
    "Q3_K": BlockType(QK_K, 110, "int4", 16, {
        "packed": Part(((0, 96),), 128, U8,
                       lambda raw: _pack((_q3_k_values(raw) + 8).astype(np.uint8), 16)),
        "values": Part(((0, 96),), QK_K, I8, _q3_k_values),
        "scales": Part(((96, 110),), 16, F32, _q3_k_scales),
        "floats": _whole(110, QK_K, _int8_floats(_q3_k_values, _q3_k_scales,
                                                 (slice(0, 96), slice(96, 110))))}),
    "Q2_K": BlockType(QK_K, 84, "int4", 16, {
        "packed": Part(((16, 80),), 128, U8, lambda raw: _pack(_q2_k_codes(raw), 16)),
        "values": Part(((16, 80),), QK_K, I8, _as_int8(_q2_k_codes)),
        "scales": Part(((80, 82), (0, 16)), 16, F32, _q2_k_scales),
        "mins": Part(((82, 84), (0, 16)), 16, F32, _q2_k_mins),
        "floats": _whole(84, QK_K, _q2_k_floats)}),
}

# The range of each type's int8 `values` (the codes it loads as int8): which fit the CPU panels'
# six-bit packing (six_bit.py) or an int4 table (quant4.table_fits_int4), for the memory plan.
CODE_RANGE = {"Q8_0": (-128, 127), "Q5_0": (-16, 15), "Q6_K": (-32, 31), "Q4_0": (-8, 7),
              "Q4_1": (0, 15), "Q4_K": (0, 15), "Q5_1": (0, 31), "Q5_K": (0, 31),
              "Q3_K": (-4, 3), "Q2_K": (0, 3)}
assert CODE_RANGE.keys() == TYPES.keys()


def two_level_tables(kind: str) -> bool:
    """Whether a type's scales (and mins) are an fp16 per 256-value super-block times integer
    sub-scales (the K-quants): what super_scales.py holds in 1.25 bytes a group, not 4."""
    return TYPES[kind].block == QK_K
