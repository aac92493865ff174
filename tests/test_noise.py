"""runtime.noise.randn against torch.randn on the CPU: bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from elite_export.runtime.float32 import fma
from elite_export.runtime.noise import randn

SEEDS = [0, 1, 2, 3, 7, 42, 1234, 99999, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**53 + 1,
         2**63 - 1, 2**64 - 1, -1, -2**63, 123456789012345]
LATENTS: list[tuple[int, ...]] = [(1, 4, 64, 64), (1, 4, 32, 32), (1, 4, 32, 48), (2, 4, 8, 8)]
ODD = [(16,), (17,), (31,), (33,), (3, 5, 7), (1, 4, 5, 5)]  # tails recomputed from 16 fresh uniforms
SMALL = [(), (1,), (2,), (3,), (1, 4, 1, 3), (15,)]  # numel < 16: torch's scalar double path

# numel >= 16 takes torch's AVX2 Box-Muller kernel (the AVX512 build reuses it); mirrored only there.
needs_avx2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="torch here draws normals with its non-AVX2 kernel")


def torch_randn(shape, seed: int) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def assert_bit_identical(shape, seed: int) -> None:
    mine, ref = randn(shape, seed), torch_randn(shape, seed)
    assert mine.dtype == np.float32 and mine.shape == ref.shape
    same = mine.view(np.int32) == ref.view(np.int32)  # also tells -0 from +0
    assert same.all(), f"{shape} seed {seed}: {int((~same).sum())} values differ"


@needs_avx2
@pytest.mark.parametrize("shape", LATENTS + ODD)
def test_bit_identical_to_torch(shape):
    for seed in SEEDS:
        assert_bit_identical(shape, seed)


@pytest.mark.parametrize("shape", SMALL)
def test_small_tensors_bit_identical_to_torch(shape):
    for seed in SEEDS:
        assert_bit_identical(shape, seed)


@needs_avx2
def test_many_values_bit_identical_to_torch():
    """4M values: some 11% of the 2**24 possible uniforms go through each of log and sincos."""
    assert_bit_identical((4, 1024, 1024), 20230816)


def test_empty():
    assert randn((0, 4), 5).shape == (0, 4)


def test_fma_rounds_once():
    f = np.float32
    a, b, c = f(2.0**-9 * (1 + 2.0**-23)), f(2.0**-8 * (1 - 2.0**-23)), f(129 + 2.0**-16)
    # a * b + c lies just below a float32 midpoint; rounding through float64 lands on the midpoint
    assert (np.float64(a) * np.float64(b) + np.float64(c)).astype(f) != c
    assert fma(a, b, c) == c
    rng = np.random.default_rng(0)
    x, y, z = rng.standard_normal((3, 1000), dtype=np.float32)
    np.testing.assert_array_equal(fma(x, y, z), (x.astype(np.float64) * y + z).astype(f))  # no ties here
