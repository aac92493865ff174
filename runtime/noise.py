"""The initial latents, torch-free: torch.randn on the CPU, bit for bit.

randn(shape, seed) == torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy() for
float32 on x86-64 CPUs with AVX2; torch's AVX2 and AVX512 builds share the kernel mirrored here. A build
without AVX2 (ATEN_CPU_CAPABILITY=default, ARM) takes a scalar libm kernel instead: ~40% of its values
differ from these, by up to 2e-6.

How torch 2.x draws it (aten/src/ATen/native/cpu/DistributionTemplates.h, CPUGeneratorImpl.cpp):
- the generator is std::mt19937 seeded with the low 32 bits of the 64-bit seed;
- numel >= 16: numel float uniforms (raw & 0xFFFFFF) / 2**24 are drawn into the output, then each full
  block of 16 becomes 8 Box-Muller pairs (u1 = 1 - x[0:8] -> radius, u2 = x[8:16] -> angle), using
  avx_mathfun.h's cephes log256_ps / sincos256_ps, which GCC compiled with fused multiply-adds; if numel
  is not a multiple of 16, 16 fresh uniforms replace the last 16 values and are transformed likewise;
- numel < 16: a scalar double Box-Muller per pair (two 53-bit uniforms, libm log1p/sin/cos) whose sine
  half is cached for the next value, rounded to float32.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.float32 import fma

F32 = np.float32
# What torch.manual_seed takes (a 64-bit integer, signed or unsigned; -1 and 2**64 - 1 are one seed).
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1
MT_STATE_SIZE = 624
LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
            -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)  # cephes logf
SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)  # cephes sinf
COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)  # cephes cosf


def check_seed(seed: int) -> None:
    """Refuse what torch.manual_seed refuses: anything but an integer in SEED_MIN..SEED_MAX."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not SEED_MIN <= seed <= SEED_MAX:
        raise EliteError(f"seed must be an integer in -2**63..2**64-1 (what torch.manual_seed takes), got {seed!r}")


def mt19937_words(seed: int, count: int) -> np.ndarray:
    """[count] uint64 holding the first 32-bit outputs of torch's CPU generator after manual_seed(seed)."""
    key = np.empty(MT_STATE_SIZE, np.uint32)
    s = seed & 0xFFFFFFFF
    for j in range(MT_STATE_SIZE):  # std::mt19937's seeding (init_genrand)
        key[j] = s
        s = (1812433253 * (s ^ (s >> 30)) + j + 1) & 0xFFFFFFFF
    bits = np.random.MT19937(0)
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": MT_STATE_SIZE}}
    return bits.random_raw(count)


def _log256(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps for x in (0, 1], as compiled: float32 [n] -> [n]."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(F32) + F32(1)  # exponent + 1
    m = ((bits & ~0x7F800000) | 0x3F000000).view(F32)  # mantissa in [0.5, 1)
    small = m < F32(0.707106781186547524)
    m = (m - F32(1)) + np.where(small, m, F32(0))  # m - 1, or 2m - 1 below sqrt(1/2)
    e = e - np.where(small, F32(1), F32(0))
    z = m * m
    y = F32(LOG_POLY[0])
    for c in LOG_POLY[1:]:
        y = fma(y, m, F32(c))
    y = fma(m * y, z, e * F32(-2.12194440e-4))
    y = fma(-z, F32(0.5), y)
    return fma(e, F32(0.693359375), m + y)


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps for x in [0, 2pi), as compiled: float32 [n] -> (sin, cos) [n]."""
    j = (x * F32(1.27323954473516)).astype(np.int32)  # octant of x (x >= 0)
    j = (j + 1) & ~1
    y = j.astype(F32)
    flip_sin = (j & 4) != 0
    flip_cos = ((j - 2) & 4) == 0
    sin_poly_here = (j & 2) == 0
    x = fma(y, F32(-0.78515625), x)  # x - y * pi/4 in three parts
    x = fma(F32(-2.4187564849853515625e-4), y, x)
    x = fma(y, F32(-3.77489497744594108e-8), x)
    z = x * x
    yc = fma(F32(COS_POLY[0]), z, F32(COS_POLY[1]))
    yc = fma(yc, z, F32(COS_POLY[2]))
    yc = fma(z, z * yc, -(z * F32(0.5))) + F32(1)
    ys = fma(F32(SIN_POLY[0]), z, F32(SIN_POLY[1]))
    ys = fma(ys, z, F32(SIN_POLY[2]))
    ys = fma(x, z * ys, x)
    ys_sin = np.where(sin_poly_here, ys, F32(0))  # the kernel selects by masking and adding
    yc_sin = np.where(sin_poly_here, F32(0), yc)
    sin = yc_sin + ys_sin
    cos = (yc - yc_sin) + (ys - ys_sin)
    return np.where(flip_sin, -sin, sin), np.where(flip_cos, -cos, cos)


def _box_muller16(u: np.ndarray) -> np.ndarray:
    """Blocks of 16 uniforms [m,16] -> normals [m,16] (normal_fill_16_AVX2)."""
    radius = np.sqrt(_log256(F32(1) - u[:, :8]) * F32(-2))  # [m,8]
    sin, cos = _sincos256(F32(2 * math.pi) * u[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1) + F32(0)  # fma(n, std 1, mean 0): -0 -> +0


def _randn_small(n: int, seed: int) -> np.ndarray:
    """numel < 16: torch's scalar normal_distribution<double>, one uniform pair per two values."""
    words = mt19937_words(seed, 4 * ((n + 1) // 2)).tolist()
    out = []
    for k in range(0, len(words), 4):
        u1 = ((words[k] << 32 | words[k + 1]) & ((1 << 53) - 1)) * 2.0 ** -53
        u2 = ((words[k + 2] << 32 | words[k + 3]) & ((1 << 53) - 1)) * 2.0 ** -53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        out += [radius * math.cos(theta), radius * math.sin(theta)]
    return np.array(out[:n], np.float64).astype(F32)


def randn(shape: Sequence[int], seed: int) -> np.ndarray:
    """float32 [*shape] standard normals, torch.randn(shape, generator=Generator().manual_seed(seed))."""
    check_seed(seed)
    shape = tuple(shape)
    n = math.prod(shape)
    if n < 16:
        return _randn_small(n, seed).reshape(shape)
    tail = n % 16
    words = mt19937_words(seed, n + (16 if tail else 0))
    u = (words & 0xFFFFFF).astype(F32) * F32(2.0 ** -24)  # [n(+16)] in [0, 1)
    out = u[:n].copy()
    full = n - tail
    out[:full] = _box_muller16(out[:full].reshape(-1, 16)).reshape(-1)
    if tail:
        out[n - 16:] = _box_muller16(u[n:].reshape(1, 16)).reshape(-1)
    return out.reshape(shape)
