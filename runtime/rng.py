"""A numpy generator that reproduces ``torch.randn`` on the CPU (float32/float16 bit for bit on x86-64).

diffusers draws initial latents (and the noise of ancestral schedulers) with
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``. To give the same image
for the same seed without torch, this module replays what ATen does:

* the generator is the 32-bit MT19937 with the reference ``init_genrand`` seeding of the seed's
  low 32 bits, the same stream as ``numpy.random.RandomState``;
* tensors of >= 16 elements take ``normal_fill``: one 24-bit uniform per element (53-bit, from two
  draws, for float64), Box-Muller over blocks of 16 (``u[j]`` with ``u[j + 8]``), and, when the size
  is not a multiple of 16, a recomputation of the last 16 values from 16 fresh uniforms;
* smaller tensors take the scalar ``normal_distribution<double>``: two 53-bit uniforms per pair,
  ``r * cos`` returned and ``r * sin`` cached in the generator for the next scalar draw (big
  tensors leave that cache alone; ``manual_seed`` clears it).

For float32, x86-64 torch builds run ``normal_fill_16_AVX2`` (also on AVX-512 machines, where the
normal kernel is not dispatched), whose log/sin/cos come from ``avx_mathfun.h`` (Cephes
polynomials). We evaluate the same polynomials in float32, with the fused multiply-adds that GCC
contracts them into, and get identical bits. Torch builds without AVX2 (e.g. aarch64) use libm in
double instead and differ from this module by about 1 ULP. float16 tensors run the same float32
kernel on a buffer padded to whole blocks of 16 (so the tail reuses the last partial block's
uniforms) and round the result; the scalar path rounds double -> float -> half.
"""

from __future__ import annotations

import numpy as np

_F32 = np.float32
_F64 = np.float64
_F16 = np.float16
_MASK32 = 0xFFFFFFFF

_LOG_P = [_F32(v) for v in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRT_HALF = _F32(0.707106781186547524)
_MINUS_DP = [_F32(v) for v in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)]
_SIN_P = [_F32(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [_F32(v) for v in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
_FOUR_OVER_PI = _F32(1.27323954473516)
_TWO_PI_F32 = _F32(2.0 * np.pi)


def _fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """Correctly rounded float32 ``a * b + c``, as the FMA instructions torch's kernel compiles to.

    ``a * b`` is exact in float64; the sum is rounded to odd (TwoSum error decides the last bit),
    which makes the final rounding to float32 free of double-rounding errors.
    """
    p = np.multiply(a, b, dtype=_F64)
    c64 = np.asarray(c, dtype=_F64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    step = np.where((err > 0) == (s > 0), 1, -1)
    return np.where(fix, bits + step, bits).view(_F64).astype(_F32)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` of avx_mathfun for x in (0, 1]."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)
    small = m < _SQRT_HALF
    m = (m - _F32(1)) + np.where(small, m, _F32(0))
    e = e - small.astype(_F32)
    z = m * m
    y = np.full_like(m, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, m, p)
    y = _fma(y * m, z, e * _LOG_Q1)
    y = _fma(z, _F32(-0.5), y)
    return _fma(e, _LOG_Q2, m + y)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` of avx_mathfun for x >= 0."""
    j = ((x * _FOUR_OVER_PI).astype(np.int32) + 1) & ~1
    y = j.astype(_F32)
    for dp in _MINUS_DP:
        x = _fma(y, dp, x)
    z = x * x
    yc = _fma(_fma(_COS_P[0], z, _COS_P[1]), z, _COS_P[2]) * z
    yc = _fma(yc, z, -(z * _F32(0.5))) + _F32(1)
    ys = _fma(_fma(_SIN_P[0], z, _SIN_P[1]), z, _SIN_P[2]) * z
    ys = _fma(ys, x, x)
    sin_poly = (j & 2) == 0
    s = np.where(sin_poly, ys, yc)
    c = np.where(sin_poly, yc, ys)
    s = np.where((j & 4) != 0, -s, s)
    c = np.where((~(j - 2) & 4) != 0, -c, c)
    return s, c


def _box_muller_f32(u: np.ndarray) -> np.ndarray:
    """``normal_fill_16_AVX2`` over blocks of 16 uniforms, u of shape (blocks, 16)."""
    radius = np.sqrt(_F32(-2) * _log_ps(_F32(1) - u[:, :8]))
    s, c = _sincos_ps(_TWO_PI_F32 * u[:, 8:])
    return np.concatenate([radius * c, radius * s], axis=1)


def _box_muller_f64(u: np.ndarray) -> np.ndarray:
    """``normal_fill_16<double>`` over blocks of 16 uniforms, u of shape (blocks, 16)."""
    radius = np.sqrt(-2.0 * np.log(1.0 - u[:, :8]))
    theta = 2.0 * np.pi * u[:, 8:]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


class TorchCompatibleGenerator:
    """Reproduces torch.Generator('cpu').manual_seed(seed) + torch.randn to within a few ULP.

    float32 and float16 are bit-identical to torch on x86-64; float64 agrees to 2 ULP (libm vs
    numpy's log/sin/cos).
    Each instance holds its own state, so use one per generation.
    """

    def __init__(self, seed: int) -> None:
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchCompatibleGenerator:
        """Reseed like torch: seeds in [-2**63, 2**64), only the low 32 bits reach MT19937."""
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside [-2**63, 2**64), which torch rejects")
        legacy = np.random.RandomState(seed & _MASK32).get_state(legacy=False)
        self._bits = np.random.MT19937(0)
        self._bits.state = {"bit_generator": "MT19937", "state": legacy["state"]}
        self._cached_normal: float | None = None
        return self

    def _draw32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform53(self, n: int) -> np.ndarray:
        """``random64()`` (first draw high) masked to 53 bits, as uniform_real_distribution<double>."""
        r = self._draw32(2 * n).astype(np.uint64)
        x = ((r[0::2] << np.uint64(32)) | r[1::2]) & np.uint64((1 << 53) - 1)
        return x.astype(_F64) * 2.0**-53

    def _uniform(self, n: int, dtype: np.dtype) -> np.ndarray:
        if dtype == _F64:
            return self._uniform53(n)
        return (self._draw32(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _normal_fill(self, n: int, dtype: np.dtype) -> np.ndarray:
        """``normal_fill``; float16 runs the float32 kernel on a buffer padded to whole blocks."""
        box_muller = _box_muller_f64 if dtype == _F64 else _box_muller_f32
        full = n - n % 16
        out = np.empty(n, dtype=dtype)
        u = self._uniform(full + 16 if dtype == _F16 and full != n else n, dtype)
        out[:full] = box_muller(u[:full].reshape(-1, 16)).reshape(-1)
        if full != n:
            tail = u[full:] if dtype == _F16 else self._uniform(16, dtype)
            out[n - 16:] = box_muller(tail.reshape(1, 16)).reshape(-1)
        return out

    def _scalar_normals(self, n: int) -> np.ndarray:
        """``normal_distribution<double>`` called n times, sharing the cached second value."""
        out = np.empty(n, dtype=_F64)
        start = 0
        if n and self._cached_normal is not None:
            out[0], start = self._cached_normal, 1
            self._cached_normal = None
        pairs = (n - start + 1) // 2
        if pairs:
            u = self._uniform53(2 * pairs)
            r = np.sqrt(-2.0 * np.log1p(-u[1::2]))
            theta = 2.0 * np.pi * u[0::2]
            values = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1)
            out[start:] = values[: n - start]
            if (n - start) % 2:
                self._cached_normal = float(values[-1])
        return out

    def randn(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """Standard normals of ``shape``, continuing the stream like successive torch.randn calls.

        float16 covers diffusers' fp16 pipelines, which draw with ``dtype=torch.float16`` on the CPU.
        """
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        if dtype not in (_F16, _F32, _F64):
            raise TypeError(f"randn supports float16, float32 and float64, not {dtype}")
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 16:
            return self._normal_fill(n, dtype).reshape(shape)
        values = self._scalar_normals(n)
        if dtype == _F16:
            values = values.astype(_F32)
        return values.astype(dtype).reshape(shape)
