"""The samplers, torch-free: numpy mirrors of the diffusers 0.42 schedulers the reference uses.

SCHEDULERS is the one table of names: each maps to the diffusers class and kwargs that the PyTorch
reference builds (elite_export.schedulers) and to the numpy class here that mirrors it, built from the
same kwargs. A mirror matches its diffusers twin step by step: `timesteps` (what the UNet is fed)
exactly; `init_noise_sigma`, `scale_model_input` and `step` to float32 precision (within 1e-6 of the
largest |value| over whole runs, tests/test_schedulers.py). The betas and alphas_cumprod are torch's bit
for bit and the steps follow diffusers' float32 0-d tensor ops in the same order; what remains is
ulp-level: torch's float32 sqrt/log/exp (MKL) are not correctly rounded and ours are, and LMS integrates
its Lagrange polynomials exactly where diffusers runs scipy's quad over a float32 integrand.

Arrays are float32 latents [B,4,h,w]; every op is elementwise, so batch rows stay independent.
A scheduler object is one sampling run: call scale_model_input(x, i) and step(eps, i, x) for
i = 0, 1, ..., len(timesteps) - 1 in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from numpy.polynomial import polynomial as P

from elite_export.errors import EliteError
from elite_export.runtime.float32 import fma

F32 = np.float32
BETA_SCHEDULES = ("linear", "scaled_linear")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def schedule_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training-schedule kwargs both sides pass to a scheduler: SCHEDULE_KEYS + prediction_type.

    Keys starting with "_" (diffusers metadata) are ignored; anything else unsupported is an error.
    """
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg.setdefault("prediction_type", "epsilon")
    missing = [k for k in SCHEDULE_KEYS if k not in cfg]
    extra = sorted(set(cfg) - set(SCHEDULE_KEYS) - {"prediction_type"})
    if missing or extra:
        raise EliteError(f"scheduler config: missing {missing}, unsupported {extra}; "
                         f"give exactly {', '.join(SCHEDULE_KEYS)} (+ prediction_type)")
    if cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise EliteError(f"beta_schedule {cfg['beta_schedule']!r} is not supported; "
                         f"choose one of {', '.join(BETA_SCHEDULES)}")
    if cfg["prediction_type"] != "epsilon":
        raise EliteError(f"prediction_type {cfg['prediction_type']!r} is not supported; only 'epsilon'")
    return cfg


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """[steps] float32, bit for bit torch.linspace(..., dtype=torch.float32) on an x86 CPU with FMA:
    the first half counts up from start, the second down from end, each value one fused multiply-add."""
    start32, end32 = F32(start), F32(end)
    step = (end32 - start32) / F32(steps - 1)
    half = steps // 2
    up = fma(step, np.arange(half, dtype=F32), start32)
    down = fma(-step, np.arange(steps - half - 1, -1, -1, dtype=F32), end32)
    return np.concatenate([up, down])


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    """[T] float32, diffusers' torch.cumprod(1 - betas) (torch accumulates float32 products in double)."""
    T = cfg["num_train_timesteps"]
    if cfg["beta_schedule"] == "linear":
        betas = torch_linspace(cfg["beta_start"], cfg["beta_end"], T)
    else:  # scaled_linear: the latent-diffusion schedule
        betas = torch_linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T) ** 2
    return np.cumprod((F32(1) - betas).astype(np.float64)).astype(F32)


def train_sigmas(cfg: Mapping[str, Any]) -> np.ndarray:
    """[T] float32 noise levels sqrt((1 - a) / a) of the training timesteps 0..T-1 (torch's sqrt is
    an ulp off this IEEE one for ~1 in 5 entries)."""
    ac = alphas_cumprod(cfg)
    return np.sqrt((F32(1) - ac) / ac)


def _log32(x: np.ndarray) -> np.ndarray:
    """float32 log, correctly rounded: nearer to torch's (MKL) than numpy's float32 log is."""
    return np.log(np.asarray(x, np.float64)).astype(F32)


def _exp32(x: np.ndarray) -> np.ndarray:
    """float32 exp, correctly rounded (see _log32)."""
    return np.exp(np.asarray(x, np.float64)).astype(F32)


class Scheduler:
    """One sampling run. timesteps: [N] float32 fed to the UNet; init_noise_sigma scales the initial noise."""

    timesteps: np.ndarray
    init_noise_sigma: float = 1.0

    def __init__(self) -> None:
        self._next_step = 0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """eps [B,4,h,w] at step i, sample x_i [B,4,h,w] -> x_{i+1} [B,4,h,w]."""
        if i != self._next_step:
            raise ValueError(f"step {i} called out of order; expected step {self._next_step}")
        self._next_step += 1
        return self._step(model_output.astype(F32, copy=False), i, sample.astype(F32, copy=False))

    def _step(self, eps: np.ndarray, i: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _SigmaScheduler(Scheduler):
    """The k-diffusion family (LMS, Euler): x is scaled by sigma, timesteps spaced linearly over 0..T-1."""

    def __init__(self, cfg: Mapping[str, Any], num_steps: int) -> None:
        super().__init__()
        T = cfg["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, num_steps, dtype=F32)[::-1].copy()  # [N]
        sigmas = np.interp(self.timesteps, np.arange(T), train_sigmas(cfg))
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)  # [N+1], ends at 0
        self.init_noise_sigma = float(self.sigmas.max())

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return sample / np.sqrt(sigma * sigma + F32(1))


class EulerDiscrete(_SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (deterministic: s_churn 0)."""

    def _step(self, eps, i, x):
        sigma = self.sigmas[i]
        derivative = (x - (x - sigma * eps)) / sigma
        return x + derivative * (self.sigmas[i + 1] - sigma)


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> np.ndarray:
    """[order] integrals over [sigmas[i], sigmas[i+1]] of the Lagrange basis through sigmas[i], ...,
    sigmas[i-order+1]; coefficient j weighs the derivative of step i-j. Exact (polynomial arithmetic)."""
    nodes = sigmas[i - np.arange(order)].astype(np.float64) - float(sigmas[i])  # shifted: sigmas[i] -> 0
    width = float(sigmas[i + 1]) - float(sigmas[i])
    coeffs = np.empty(order)
    for j in range(order):
        others = np.delete(nodes, j)
        basis = P.polyfromroots(others) / np.prod(nodes[j] - others)
        coeffs[j] = P.polyval(width, P.polyint(basis))  # the antiderivative is 0 at the shifted origin
    return coeffs


class LMSDiscrete(_SigmaScheduler):
    """diffusers' LMSDiscreteScheduler, order 4 (the ELITE paper's sampler)."""

    ORDER = 4

    def __init__(self, cfg: Mapping[str, Any], num_steps: int) -> None:
        super().__init__(cfg, num_steps)
        self._derivatives: list[np.ndarray] = []  # newest last, at most ORDER
        # step i weighs min(i + 1, ORDER) derivatives; computed here, off the denoising loop (~0.4 ms each)
        self._coeffs = [lms_coefficients(self.sigmas, i, min(i + 1, self.ORDER)).astype(F32)
                        for i in range(num_steps)]

    def _step(self, eps, i, x):
        sigma = self.sigmas[i]
        derivative = (x - (x - sigma * eps)) / sigma
        self._derivatives = (self._derivatives + [derivative])[-self.ORDER:]
        coeffs = self._coeffs[i]
        update = coeffs[0] * self._derivatives[-1]
        for c, d in zip(coeffs[1:], reversed(self._derivatives[:-1])):
            update = update + c * d
        return x + update


class DPMSolverPlusPlus2M(Scheduler):
    """diffusers' DPMSolverMultistepScheduler, DPM-Solver++ (2M, midpoint), optionally on Karras sigmas.
    First order on the first and the last step (final sigma 0), second order in between."""

    def __init__(self, cfg: Mapping[str, Any], num_steps: int, *, algorithm_type: str, solver_order: int,
                 use_karras_sigmas: bool = False) -> None:
        if (algorithm_type, solver_order) != ("dpmsolver++", 2):
            raise ValueError("only DPM-Solver++ of order 2 is mirrored")
        super().__init__()
        T = cfg["num_train_timesteps"]
        sigmas = train_sigmas(cfg)  # [T] float32
        if use_karras_sigmas:
            sig = self._karras(float(sigmas[0]), float(sigmas[-1]), num_steps)
            timesteps = self._sigma_to_t(sig, np.log(sigmas)).round()
        else:
            timesteps = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
            sig = np.interp(timesteps, np.arange(T), sigmas)
        self.timesteps = timesteps.astype(F32)  # [N], whole numbers
        self.sigmas = np.concatenate([sig, [0.0]]).astype(F32)  # [N+1], ends at 0
        self.alpha = F32(1) / np.sqrt(self.sigmas * self.sigmas + F32(1))  # [N+1]
        self.sigma_t = self.sigmas * self.alpha
        with np.errstate(divide="ignore"):  # sigma 0: lambda = +inf, so exp(-h) = 0
            self.lam = _log32(self.alpha) - _log32(self.sigma_t)  # [N+1] log-SNR / 2
        self._prev_x0: np.ndarray | None = None

    @staticmethod
    def _karras(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
        rho = 7.0
        ramp = np.linspace(0, 1, num_steps)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho

    @staticmethod
    def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
        """[N] fractional training timesteps of `sigma`, interpolating log sigma (diffusers' _sigma_to_t)."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]  # [T,N]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def _step(self, eps, i, x):
        x0 = (x - self.sigma_t[i] * eps) / self.alpha[i]  # the data prediction
        h = self.lam[i + 1] - self.lam[i]
        c = self.alpha[i + 1] * (_exp32(-h) - F32(1))
        out = (self.sigma_t[i + 1] / self.sigma_t[i]) * x - c * x0
        if 0 < i < len(self.timesteps) - 1:  # second order: D1 from the previous data prediction
            r0 = (self.lam[i] - self.lam[i - 1]) / h
            d1 = (F32(1) / r0) * (x0 - self._prev_x0)
            out = out - (F32(0.5) * c) * d1
        self._prev_x0 = x0
        return out


class DDIM(Scheduler):
    """diffusers' DDIMScheduler with Stable Diffusion's settings (its shipped scheduler config): eta 0,
    "leading" spacing shifted by steps_offset 1, no x0 clipping (clipping latents to [-1, 1] would
    hurt images), the final alpha_prod the first training step's (set_alpha_to_one False)."""

    def __init__(self, cfg: Mapping[str, Any], num_steps: int, *, clip_sample: bool, set_alpha_to_one: bool,
                 steps_offset: int) -> None:
        super().__init__()
        ratio = cfg["num_train_timesteps"] // num_steps
        t = (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset  # [N]
        self.timesteps = t.astype(F32)
        ac = alphas_cumprod(cfg)
        final = F32(1) if set_alpha_to_one else ac[0]
        self.alpha_prod = ac[t]  # [N]
        self.alpha_prod_prev = np.where(t - ratio >= 0, ac[np.maximum(t - ratio, 0)], final)  # [N]
        self.clip_sample = clip_sample

    def _step(self, eps, i, x):
        a, a_prev = self.alpha_prod[i], self.alpha_prod_prev[i]
        x0 = (x - np.sqrt(F32(1) - a) * eps) / np.sqrt(a)
        if self.clip_sample:
            x0 = np.clip(x0, F32(-1), F32(1))
        return np.sqrt(a_prev) * x0 + np.sqrt(F32(1) - a_prev) * eps


@dataclass(frozen=True)
class SchedulerSpec:
    """What a scheduler name means on both sides: the diffusers class and the kwargs it gets on top of
    schedule_config (the numpy mirror is built from the same kwargs)."""

    diffusers_class: str
    diffusers_kwargs: Mapping[str, Any]
    numpy_class: Callable[..., Scheduler]  # (schedule_config, num_steps, **diffusers_kwargs)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SCHEDULERS: dict[str, SchedulerSpec] = {
    "lms": SchedulerSpec("LMSDiscreteScheduler", {}, LMSDiscrete),  # the ELITE paper's
    "dpm++": SchedulerSpec("DPMSolverMultistepScheduler", _DPMPP_2M, DPMSolverPlusPlus2M),
    "dpm++karras": SchedulerSpec("DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": True},
                                 DPMSolverPlusPlus2M),
    "euler": SchedulerSpec("EulerDiscreteScheduler", {}, EulerDiscrete),
    "ddim": SchedulerSpec("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
                          DDIM),  # Stable Diffusion's DDIM settings
}
SCHEDULER_NAMES = tuple(SCHEDULERS)
DEFAULT_SCHEDULER = "lms"


def scheduler_spec(name: str) -> SchedulerSpec:
    if name not in SCHEDULERS:
        raise EliteError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return SCHEDULERS[name]


def make_scheduler(name: str, config: Mapping[str, Any], num_steps: int) -> Scheduler:
    """The numpy scheduler `name` for one run of `num_steps` steps on the training schedule `config`."""
    spec = scheduler_spec(name)
    cfg = schedule_config(config)
    if not 1 <= num_steps <= cfg["num_train_timesteps"]:
        raise EliteError(f"steps must be in 1..{cfg['num_train_timesteps']}, got {num_steps}")
    return spec.numpy_class(cfg, num_steps, **spec.diffusers_kwargs)
