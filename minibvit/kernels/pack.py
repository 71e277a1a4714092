"""Packing signs and {0, 1} masks into uint64 words along the reduction axis, and back.

Bit convention (larq compute-engine): bit 0 encodes +1, bit 1 encodes -1, and sign(0) = +1, so
``x >= 0`` packs to bit 0 (``-0.0`` too) and ``x < 0`` packs to bit 1 (NaN packs to bit 0). Bit j of
word w holds element 64*w + j. Each fast packer has a NumPy reference (np.packbits) beside it.
Also the operand checks every kernel module shares.

The zero-tail contract: when 64 does not divide K, the last word of every packed row holds only
K % 64 elements, and its remaining bits (the tail) are 0. The packers write it so by construction;
the kernels rely on it and do not check it (a check inside the GEMM would cost a pass over the
operands on every call): a set tail bit is counted by popcount like any other, so binary_gemm's
K - 2 popcount(a XOR w) comes out 2 too small for every tail bit set in one operand and not the
other. Operands that come from elsewhere (a file, another program) are checked once where that
costs nothing: check_zero_tail, called by the packed engine at export and at load.
"""
import contextlib

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..intrinsics import bits64

WORD_BITS = 64
# Below these sizes a kernel runs on the calling thread only: even a spinning OpenMP worker
# (GOMP_SPINCOUNT exported) costs a few microseconds to start, a sleeping one ~50 us in a VM.
# Measured at 2 threads on the 8 shapes M in {520, 1576}, K, N in {192, 384}: popcount threshold 2M
# words 4.6x median over NumPy, 512K words 8.1x, 128K words 8.2x; packing threshold 1M -> 256K elements
# took the with-packing median from 5.2x to 6.0x. Without the spin (minibvit's default) the 32-shape
# 2-thread median was 6.92x with these thresholds and 7.10x with the old ones: within noise.
_PARALLEL_MIN_ELEMENTS = 1 << 18    # packing: elements


def words(k):
    return (k + WORD_BITS - 1) // WORD_BITS


@contextlib.contextmanager
def threads_for(work, parallel_min):
    """Yield the thread count a prange kernel should use: Numba's current one, or 1 (set for the
    duration) when work < parallel_min."""
    threads = numba.get_num_threads()
    if work >= parallel_min or threads == 1:
        yield threads
        return
    numba.set_num_threads(1)
    try:
        yield 1
    finally:
        numba.set_num_threads(threads)


def _bit(value):
    """The packed bit of one element: value < 0 for floats (sign bit; NaN and -0.0 give 0),
    value != 0 for integers (masks)."""
    return value < 0 if isinstance(value, (float, np.floating)) else value != 0


@overload(_bit, inline="always")
def _bit_overload(value):
    if isinstance(value, types.Float):
        return lambda value: np.uint64(value < 0)
    return lambda value: np.uint64(value != 0)


@njit(parallel=True, cache=True)
def _pack_rows(x):
    """uint64 [R, ceil(K/64)] from x [R, K]: bit = _bit(x) (x < 0 for floats, x != 0 for integers)."""
    rows, k = x.shape
    out = np.empty((rows, (k + 63) // 64), np.uint64)
    for r in prange(rows):
        pack_row(x[r], out[r])
    return out


@njit(inline="always")
def pack_row(row, words):
    """words [ceil(K/64)] = the packed bits of one contiguous row [K] (_bit; tail bits 0)."""
    k = row.shape[0]
    n_words = (k + 63) // 64
    full_words = k // 64
    for w in range(full_words):
        words[w] = bits64(row, 64 * w)
    if full_words < n_words:
        word = np.uint64(0)
        for j in range(64 * full_words, k):
            word |= _bit(row[j]) << np.uint64(j - 64 * full_words)
        words[full_words] = word


def tail_mask(k):
    """uint64 with the tail bits of a last word of K elements set (bits K % 64 .. 63; 0 when 64
    divides K): the bits that must be zero in every packed operand."""
    used = k % WORD_BITS
    return np.uint64(0) if used == 0 else ~np.uint64((1 << used) - 1)


def check_zero_tail(packed, k, name, word_axis=-1):
    """Refuse packed words whose tail is not zero (the zero-tail contract, module docstring).

    Inputs:
        packed:    uint64 array packed along K on axis word_axis (-1 for activations [..., W],
                   0 for word-major weights [W, N])
        k:         the true length K
        name:      the operand's name, for the message
    Returns packed unchanged; ValueError naming the operand and the first bad word otherwise.
    Reads only the last word of each row (N words for a weight [W, N])."""
    packed = np.asarray(packed)
    mask = tail_mask(k)
    if mask:
        last = np.take(packed, -1, axis=word_axis)
        bad = np.flatnonzero(last & mask)
        if bad.size:
            raise ValueError(f"{name} has bits set in the tail of its last packed word (K={k}: bits "
                             f"{k % WORD_BITS}..63 of word {packed.shape[word_axis] - 1} must be 0) in {bad.size} "
                             f"of its {last.size} packed vectors (the first at index {bad[0]}); the kernels would "
                             f"count them and return wrong results. Pack it with minibvit.kernels (pack_signs, "
                             f"pack_bits, pack_weight) or clear the tail bits")
    return packed


def _as_rows(x, name):
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the packed axis K is the last one)")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last axis; K must be >= 1")
    return x, np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


# The float dtypes the Numba packer reads directly (native byte order).
_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Mask dtypes pack_bits accepts (numpy kind codes): bool, signed / unsigned integer, float, complex.
_MASK_KINDS = "biufc"


def _pack_mask(rows, shape):
    """uint64 words of a bool [R, K] (bit = True), reshaped to shape[:-1] + (ceil(K/64),)."""
    with threads_for(rows.size, _PARALLEL_MIN_ELEMENTS):
        packed = _pack_rows(rows.view(np.uint8))
    return packed.reshape(shape[:-1] + (words(shape[-1]),))


def pack_signs(x):
    """Pack the signs of the last axis of a float array into uint64 words.

    Inputs:
        x: float array [..., K], any float dtype and byte order
    Returns:
        uint64 [..., ceil(K/64)]; bit j of word w is 1 where x[..., 64*w + j] < 0 (sign -1),
        0 where x >= 0 (sign(0) = +1); tail bits of the last word are 0.
    float32 and float64 in native byte order are packed by the Numba kernel. Every other float dtype
    (float16, longdouble, a non-native byte order) is packed from NumPy's ``x < 0`` computed in the
    array's own dtype: that comparison is exact in every float dtype (-0.0 and NaN give False), so
    the bits are exactly the signs, with no conversion that could round a tiny negative longdouble
    to -0.0 (which would flip its bit). It costs one extra pass and a bool array. Non-float input
    is refused with a TypeError (integers and bools: use pack_bits for masks).
    """
    x, rows = _as_rows(x, "x")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"pack_signs expects a float array, got {x.dtype}; use pack_bits for masks")
    if rows.dtype not in _NATIVE_FLOATS:
        return _pack_mask(rows < 0, x.shape)
    with threads_for(rows.size, _PARALLEL_MIN_ELEMENTS):
        packed = _pack_rows(rows)
    return packed.reshape(x.shape[:-1] + (words(x.shape[-1]),))


def pack_bits(mask):
    """Pack a {0,1} (or bool) mask along its last axis: bit = 1 where the mask is nonzero.

    Inputs:
        mask: bool or numeric (integer, float, complex; any byte order) array [..., K]
    Returns:
        uint64 [..., ceil(K/64)], tail bits 0.
    Other dtypes (strings, objects, dates) are refused with a TypeError: ``!= 0`` is not a mask test
    for them (a string array compares unequal to 0 everywhere).
    """
    mask, rows = _as_rows(mask, "mask")
    if rows.dtype.kind not in _MASK_KINDS:
        raise TypeError(f"pack_bits expects a bool or numeric mask, got {rows.dtype}; convert it to bool first")
    if rows.dtype != np.bool_:
        rows = rows != 0
    return _pack_mask(rows, mask.shape)


def _packbits_reference(bits):
    k = bits.shape[-1]
    pad = words(k) * WORD_BITS - k
    bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return packed.view("<u8").astype(np.uint64)


def pack_signs_reference(x):
    """NumPy reference of pack_signs (np.packbits, little bit order)."""
    x = np.asarray(x)
    return _packbits_reference(x < 0)


def pack_bits_reference(mask):
    """NumPy reference of pack_bits."""
    return _packbits_reference(np.asarray(mask) != 0)


def check_packed(packed, k, name):
    packed = np.asarray(packed)
    if packed.dtype != np.uint64:
        raise TypeError(f"{name} must be uint64 packed words, got {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] != words(k):
        raise ValueError(f"{name} has {packed.shape[-1] if packed.ndim else 0} words on its last "
                         f"axis but K={k} needs ceil(K/64)={words(k)}")
    return packed


def unpack_bits(packed, k):
    """Inverse of pack_bits: uint64 [..., ceil(K/64)] -> uint8 {0,1} [..., K]."""
    packed = check_packed(packed, k, "packed")
    as_bytes = np.ascontiguousarray(packed.astype("<u8")).view(np.uint8)
    return np.unpackbits(as_bytes, axis=-1, count=k, bitorder="little")


def unpack_signs(packed, k):
    """Inverse of pack_signs: uint64 [..., ceil(K/64)] -> float32 +-1 [..., K] (bit 1 -> -1)."""
    return (1.0 - 2.0 * unpack_bits(packed, k)).astype(np.float32)


def pack_weight(w):
    """Lay out a float weight [N, K] (y = x @ w.T) for binary_gemm: signs packed along K,
    transposed word-major.

    Inputs:
        w: float [N, K]
    Returns:
        uint64 [ceil(K/64), N] C-contiguous: w_packed_T[w_idx, n] holds K-bits 64*w_idx.. of row n.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_weight expects a 2-D weight [N, K], got shape {w.shape}")
    return np.ascontiguousarray(pack_signs(w).T)


def pack_ternary_weight(w):
    """Bit-planes of a ternary weight [N, K] with values in {-1, 0, +1}, laid out word-major.

    Returns:
        (w_nonzero, w_sign): uint64 [ceil(K/64), N] each; nonzero bit = (w != 0),
        sign bit = (w < 0) (so sign bits are 0 wherever the weight is 0).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_ternary_weight expects a 2-D weight [N, K], got shape {w.shape}")
    if not np.isin(w, (-1, 0, 1)).all():
        raise ValueError("pack_ternary_weight expects values in {-1, 0, +1}; quantize first")
    return (np.ascontiguousarray(pack_bits(w != 0).T),
            np.ascontiguousarray(pack_bits(w < 0).T))


def unpack_ternary(w_nonzero, w_sign, K):
    """Inverse of pack_ternary_weight: int8 {-1,0,+1} [N, K] from the word-major bit-planes."""
    nz = unpack_bits(np.ascontiguousarray(np.asarray(w_nonzero).T), K).astype(np.int8)
    neg = unpack_bits(np.ascontiguousarray(np.asarray(w_sign).T), K).astype(np.int8)
    return nz * (1 - 2 * neg)


def check_k(k, n_words, name):
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"K must be an int (the true unpacked length), got {type(k).__name__}")
    if not (n_words - 1) * WORD_BITS < k <= n_words * WORD_BITS:
        raise ValueError(f"K={k} does not match {n_words} packed words in {name}: "
                         f"need {(n_words - 1) * WORD_BITS} < K <= {n_words * WORD_BITS}")
    return int(k)


def check_words(x, name, ndim):
    x = np.asarray(x)
    if x.dtype != np.uint64:
        raise TypeError(f"{name} must be uint64 packed words (see pack_signs / pack_bits), got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {x.shape}")
    return np.ascontiguousarray(x)


def row_popcount(x):
    """int64 [...]: popcount summed over the last (word) axis."""
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
