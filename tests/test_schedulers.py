"""The numpy schedulers against their diffusers twins, step by step, and the one table of names."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate

from conftest import assert_close
from elite_export.errors import EliteError
from elite_export.runtime.requests import PAPER_SCHEDULER_CONFIG
from elite_export.runtime.schedulers import (DEFAULT_SCHEDULER, SCHEDULER_NAMES, SCHEDULERS, alphas_cumprod,
                                             lms_coefficients, make_scheduler, schedule_config, torch_linspace)
from elite_export.schedulers import make_diffusers_scheduler

LINEAR_CONFIG = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000}
# Measured worst |numpy - diffusers| / max|diffusers| over whole runs: 1.0e-6 (DPM++ 50 steps), 8.4e-7 (LMS
# 100 steps; 4.6e-5 absolute at |x| <= 58). Its sources are ulp-level: torch's float32 sqrt (MKL) is not
# correctly rounded, so diffusers' sigma tables and sqrt(sigma^2 + 1) are an ulp off IEEE's in ~19% of
# entries, and diffusers integrates LMS's polynomials over a float32 integrand where we are exact.
REL_TOL = 3e-6
LATENT = (2, 4, 16, 16)


def run_both(name: str, steps: int, config: dict, seed: int = 0):
    """Yields (what, numpy, diffusers) along one run fed the same random noise and model outputs."""
    ref = make_diffusers_scheduler(name, config)
    ref.set_timesteps(steps)
    mine = make_scheduler(name, config, steps)
    yield "timesteps", mine.timesteps, ref.timesteps.numpy().astype(np.float32)
    yield "init_noise_sigma", np.float32(mine.init_noise_sigma), np.float32(ref.init_noise_sigma)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(LATENT, dtype=np.float32)
    x, x_ref = noise * mine.init_noise_sigma, torch.from_numpy(noise) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        eps = rng.standard_normal(LATENT, dtype=np.float32)
        yield f"scale_model_input {i}", mine.scale_model_input(x, i), ref.scale_model_input(x_ref, t).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LMS: "call scale_model_input first" (it was)
            x_ref = ref.step(torch.from_numpy(eps), t, x_ref).prev_sample
        x = mine.step(eps, i, x)
        yield f"step {i}", x, x_ref.numpy()


def check_run(name: str, steps: int, config: dict) -> None:
    for what, mine, ref in run_both(name, steps, config):
        assert mine.dtype == np.float32, what
        if what == "timesteps":
            np.testing.assert_array_equal(mine, ref, err_msg=what)
        else:
            assert_close(mine, ref, atol=REL_TOL * float(np.abs(ref).max()), what=f"{name} {steps}: {what}")


@pytest.mark.parametrize("name,steps", [("lms", 10), ("lms", 25), ("lms", 100)]
                         + [(n, s) for n in SCHEDULER_NAMES if n != "lms" for s in (20, 50)])
def test_matches_diffusers_step_by_step(name, steps):
    check_run(name, steps, PAPER_SCHEDULER_CONFIG)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_matches_diffusers_on_linear_betas(name):
    check_run(name, 30, LINEAR_CONFIG)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_few_steps(name):
    for steps in (1, 2, 3):
        check_run(name, steps, PAPER_SCHEDULER_CONFIG)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_batch_rows_are_independent(name):
    rng = np.random.default_rng(1)
    x, eps = rng.standard_normal((2, 2, *LATENT[1:]), dtype=np.float32)  # [2,B,4,h,w]
    both, row = make_scheduler(name, PAPER_SCHEDULER_CONFIG, 8), make_scheduler(name, PAPER_SCHEDULER_CONFIG, 8)
    xb, xr = x, x[1:]
    for i in range(8):
        xb = both.step(eps * i, i, both.scale_model_input(xb, i))
        xr = row.step(eps[1:] * i, i, row.scale_model_input(xr, i))
    np.testing.assert_array_equal(xb[1:], xr)


def test_training_schedule_is_torchs_bit_for_bit():
    for start, end, steps in [(0.00085 ** 0.5, 0.012 ** 0.5, 1000), (0.0001, 0.02, 1000), (-0.3, 2.7, 777), (0, 1, 2)]:
        ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(torch_linspace(start, end, steps), ref)
    for config in (PAPER_SCHEDULER_CONFIG, LINEAR_CONFIG):
        ref = make_diffusers_scheduler("lms", config).alphas_cumprod.numpy()
        np.testing.assert_array_equal(alphas_cumprod(schedule_config(config)), ref)


def test_lms_coefficients_are_the_exact_integrals():
    sigmas = make_scheduler("lms", PAPER_SCHEDULER_CONFIG, 25).sigmas.astype(np.float64)
    for i in (0, 1, 2, 3, 12, 24):
        order = min(i + 1, 4)
        for j, coeff in enumerate(lms_coefficients(sigmas, i, order)):
            def basis(tau):
                others = [sigmas[i - k] for k in range(order) if k != j]
                return np.prod([(tau - s) / (sigmas[i - j] - s) for s in others])
            exact = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=0, epsrel=1e-13)[0]
            assert coeff == pytest.approx(exact, rel=1e-11, abs=1e-14), (i, j)


def test_one_table_of_names():
    assert SCHEDULER_NAMES == tuple(SCHEDULERS) == ("lms", "dpm++", "dpm++karras", "euler", "ddim")
    assert DEFAULT_SCHEDULER == "lms"
    for name, spec in SCHEDULERS.items():
        ref = make_diffusers_scheduler(name, PAPER_SCHEDULER_CONFIG)
        assert type(ref).__name__ == spec.diffusers_class
        assert {k: ref.config[k] for k in spec.diffusers_kwargs} == dict(spec.diffusers_kwargs)
        assert isinstance(make_scheduler(name, PAPER_SCHEDULER_CONFIG, 10), spec.numpy_class)


@pytest.mark.parametrize("make", [lambda n: make_scheduler(n, PAPER_SCHEDULER_CONFIG, 10),
                                  lambda n: make_diffusers_scheduler(n, PAPER_SCHEDULER_CONFIG)])
def test_unknown_name_lists_the_valid_ones(make):
    with pytest.raises(EliteError) as err:
        make("heun")
    message = str(err.value)
    assert "\n" not in message and "'heun'" in message
    assert all(name in message for name in SCHEDULER_NAMES)


@pytest.mark.parametrize("change,words", [({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
                                          ({"prediction_type": "v_prediction"}, "prediction_type"),
                                          ({"steps_offset": 1}, "steps_offset"),
                                          ({"beta_end": None}, "missing")])
def test_config_errors(change, words):
    config = {k: v for k, v in {**PAPER_SCHEDULER_CONFIG, **change}.items() if v is not None}
    with pytest.raises(EliteError, match=words):
        make_scheduler("lms", config, 10)
    with pytest.raises(EliteError, match=words):
        make_diffusers_scheduler("lms", config)


def test_config_metadata_is_ignored_and_epsilon_is_the_default():
    config = {**PAPER_SCHEDULER_CONFIG, "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0"}
    assert schedule_config(config) == {**PAPER_SCHEDULER_CONFIG, "prediction_type": "epsilon"}


def test_step_count_and_order_are_checked():
    for steps in (0, 1001):
        with pytest.raises(EliteError, match="steps"):
            make_scheduler("lms", PAPER_SCHEDULER_CONFIG, steps)
    scheduler = make_scheduler("dpm++", PAPER_SCHEDULER_CONFIG, 10)
    x = np.zeros(LATENT, np.float32)
    scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="out of order"):
        scheduler.step(x, 2, x)


def test_runtime_modules_are_torch_free():
    code = ("import sys, elite_export.runtime.schedulers, elite_export.runtime.noise; "
            "bad = {'torch', 'diffusers', 'transformers', 'scipy'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
