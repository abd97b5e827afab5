"""What ONNX Runtime computes for a dynamic int8 matrix product on each CPU family, in numpy, and int8 weights
that compute the same on all of them.

ONNX Runtime's dynamic int8 product is ``DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, w_s8, zp)`` (fused into
DynamicQuantizeMatMul when the session loads). Both halves are reproduced here bit for bit:

- ``dynamic_quantize``: the range always holds 0, ``scale = (max - min) / 255``, the zero point and the values
  rounded half to even, ``x / scale`` a float32 division (MLAS divides; it does not multiply by a reciprocal).
- ``matmul_integer``: the int32 result. ``exact`` arithmetic (VNNI, ARM64) is the true sum. ``saturating-pairs``
  (x86 without VNNI) is how MLAS's AVX2/AVX-512BW kernels compute it: B is packed four K positions at a time
  (K padded with zeros to a multiple of 4), VPMADDUBSW multiplies the raw uint8 activations by the int8 weights
  and adds positions (2j, 2j+1) into a saturating int16, VPMADDWD widens the pairs into int32, and the
  activation zero point is subtracted afterwards as ``zp * column_sum(B)``. So the clipping applies to
  ``a[2j] * b[2j] + a[2j+1] * b[2j+1]`` with *raw* uint8 activations (0..255), before the zero point.

Since a in [0, 255], a pair can only leave int16 when both weights have the same sign and
``|b[2j]| + |b[2j+1]| > 128`` (255 * 128 = 32640 still fits). ``pair_safe`` quantizes weights so that no pair
does: then every CPU family computes the same integers for any input, and an artifact's numbers hold wherever it
runs. The cost is a coarser scale on the columns that need it; ``tests/export/test_int8_arith.py`` checks all of this
against ONNX Runtime on the machine at hand.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dynamic_quantize", "matmul_integer", "risky_pairs", "pair_safe", "safe_any_order", "PAIR_LIMIT",
           "INT16"]

INT16 = (-32768, 32767)
PAIR_LIMIT = 128  # same-sign |b0| + |b1| up to this never saturates: 255 * 128 = 32640 <= 32767


def dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX Runtime's DynamicQuantizeLinear: uint8 values, float32 scale and uint8 zero point of ``x``."""
    x = np.asarray(x, dtype=np.float32)
    lo = np.float32(min(float(x.min()), 0.0)) if x.size else np.float32(0)
    hi = np.float32(max(float(x.max()), 0.0)) if x.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(255))
    if scale == 0:
        return np.zeros(x.shape, np.uint8), np.float32(0), np.uint8(0)
    zero = np.uint8(np.clip(np.rint(np.float32(0) - lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + np.float32(zero), 0, 255).astype(np.uint8)
    return q, scale, zero


def matmul_integer(a: np.ndarray, b: np.ndarray, a_zero: int | np.ndarray = 0, b_zero: int | np.ndarray = 0,
                   arithmetic: str = "exact") -> np.ndarray:
    """The int32 result of MatMulInteger(a, b, a_zero, b_zero) for uint8 ``a`` (..., K) and ``b`` (K, N) under
    ``arithmetic`` ("exact" or "saturating-pairs"). Only uint8 x int8 products saturate; uint8 x uint8 runs
    through 16-bit widening on every x86 kernel and is exact."""
    a = np.asarray(a)
    b = np.asarray(b)
    a64 = a.astype(np.int64)
    b64 = b.astype(np.int64)
    bz = np.asarray(b_zero, dtype=np.int64)
    # float64 holds every partial sum exactly (|sum| < K * 255 * 255 << 2**53), and BLAS is far faster than int64.
    out = (a64 - int(a_zero)).astype(np.float64) @ (b64 - bz).astype(np.float64)
    if arithmetic == "saturating-pairs" and b.dtype == np.int8:
        out += _saturation(a64, b64)
    elif arithmetic not in ("exact", "saturating-pairs"):
        raise ValueError(f"unknown arithmetic {arithmetic!r}")
    return np.rint(out).astype(np.int64).astype(np.int32)


def risky_pairs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pair index j, column n) of every K pair (2j, 2j+1) of int8 ``b`` (K, N) that can leave int16 for some
    uint8 input: same sign and |b0| + |b1| > PAIR_LIMIT."""
    b0, b1 = _pairs(np.asarray(b).astype(np.int32))
    risky = (b0 * b1 > 0) & (np.abs(b0 + b1) > PAIR_LIMIT)
    return np.nonzero(risky)


def _pairs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = b.shape[0]
    if k % 2:
        b = np.concatenate([b, np.zeros((1, b.shape[1]), b.dtype)])
    return b[0::2], b[1::2]


def _saturation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """clip(p) - p summed per column over the pairs p = a[2j] b[2j] + a[2j+1] b[2j+1] that can saturate; zero
    elsewhere. Only risky pairs are visited: they are a few percent of all pairs."""
    j, n = risky_pairs(b)
    out = np.zeros(a.shape[:-1] + (b.shape[1],), dtype=np.float64)
    if not len(j):
        return out
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (1,), a.dtype)], axis=-1)
        b = np.concatenate([b, np.zeros((1, b.shape[1]), b.dtype)])
    p = a[..., 2 * j] * b[2 * j, n] + a[..., 2 * j + 1] * b[2 * j + 1, n]
    excess = (np.clip(p, *INT16) - p).astype(np.float64)
    flat = out.reshape(-1, b.shape[1])
    np.add.at(flat.T, n, excess.reshape(-1, len(n)).T)
    return out


def pair_safe(w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-column quantization of a (K, N) MatMul weight in which no K pair can saturate.

    Returns (int8 values, float32 scales of shape (N,)). Each column takes the better of two repairs of its
    plain int8 rounding (scale max|w| / 127), by the error weighted with ``importance`` (per K row: the mean
    squared activation, so that rows the data drives hard count more; uniform when None):

    - a coarser scale, just large enough that the largest same-sign pair fits (every weight rounds coarser);
    - the plain scale with each offending pair shrunk onto |b0| + |b1| = PAIR_LIMIT (only those weights move).
    """
    w = np.asarray(w, dtype=np.float32)
    k = w.shape[0]
    imp = np.ones(k, np.float64) if importance is None else np.maximum(np.asarray(importance, np.float64), 1e-12)
    if k % 2:  # a zero row pads the last pair, as MLAS pads K
        w = np.concatenate([w, np.zeros((1, w.shape[1]), np.float32)])
        imp = np.concatenate([imp, [0.0]])
    base = np.maximum(np.abs(w).max(axis=0) / 127.0, 1e-12).astype(np.float32)

    def rounded(scale: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(w / scale), -127, 127).astype(np.int32)

    def worst_pair(q: np.ndarray) -> np.ndarray:
        q0, q1 = q[0::2], q[1::2]
        return np.where(q0 * q1 > 0, np.abs(q0 + q1), 0).max(axis=0)

    q = rounded(base)
    over = worst_pair(q)
    bad = over > PAIR_LIMIT
    if not bad.any():
        return q[:k].astype(np.int8), base

    # Repair 1: grow the scale of the bad columns until their worst pair fits (re-rounding can push a pair one
    # step past the limit, so grow a little more until it really fits).
    coarse = base.copy()
    coarse[bad] = base[bad] * over[bad] / PAIR_LIMIT
    qc = rounded(coarse)
    still = worst_pair(qc) > PAIR_LIMIT
    while still.any():
        coarse[still] *= np.float32(1.002)
        qc[:, still] = rounded(coarse)[:, still]
        still = worst_pair(qc) > PAIR_LIMIT

    # Repair 2: keep the scale, shrink each offending pair proportionally onto the limit.
    qs = q.copy()
    q0, q1 = qs[0::2], qs[1::2]  # views
    fix = (q0 * q1 > 0) & (np.abs(q0 + q1) > PAIR_LIMIT)
    total = np.maximum(np.abs(q0) + np.abs(q1), 1)
    new0 = np.sign(q0) * np.floor(np.abs(q0) * PAIR_LIMIT / total + 0.5)
    new1 = np.sign(q1) * (PAIR_LIMIT - np.abs(new0))
    q0[fix] = new0[fix]
    q1[fix] = new1[fix]

    def error(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return ((w - values * scale) ** 2 * imp[:, None]).sum(axis=0)

    use_coarse = error(qc, coarse) <= error(qs, base)
    out = np.where(use_coarse[None, :], qc, qs)
    scale = np.where(use_coarse, coarse, base).astype(np.float32)
    return out[:k].astype(np.int8), scale


def safe_any_order(q: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Requantize int8 ``q`` (``scale``: one per output channel along ``axis``, or one for the tensor) so that no
    two of a channel's weights of the same sign exceed PAIR_LIMIT together, whatever pairs a kernel forms (Conv and
    QDQ kernels pack K in their own order). A tensor already safe is returned as it is; otherwise the channels
    that need it (all of them, for one shared scale) get the smallest coarser scale that makes them safe.
    Returns (int8 values, float32 scales shaped like ``scale``)."""
    q = np.asarray(q).astype(np.int32)
    scale = np.asarray(scale, np.float32)
    channels = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)  # (channels, K)
    shared = scale.size == 1
    s = np.full(channels.shape[0], scale.reshape(-1)[0], np.float32) if shared else scale.reshape(-1).copy()
    w = channels * s[:, None]

    def over(values: np.ndarray) -> np.ndarray:
        pos = -np.sort(-np.where(values > 0, values, 0), axis=1)[:, :2].sum(axis=1)
        neg = -np.sort(-np.where(values < 0, -values, 0), axis=1)[:, :2].sum(axis=1)
        worst = np.maximum(pos, neg)
        return np.full_like(worst, worst.max()) if shared else worst

    worst = over(channels)
    bad = worst > PAIR_LIMIT
    if not bad.any():
        return q.astype(np.int8), scale
    s[bad] *= worst[bad] / PAIR_LIMIT
    values = channels.copy()
    while bad.any():
        values[bad] = np.clip(np.rint(w[bad] / s[bad, None]), -127, 127)
        bad = over(values) > PAIR_LIMIT
        s[bad] *= np.float32(1.002)
    shape = list(q.shape)
    shape.insert(0, shape.pop(axis))
    out = np.moveaxis(values.reshape(shape), 0, axis)
    new_scale = np.float32(s[0]).reshape(scale.shape) if shared else s.reshape(scale.shape)
    return out.astype(np.int8), new_scale.astype(np.float32)
