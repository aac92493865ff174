"""Click options shared by `elite-export generate` (the reference) and `elite-run` (the runtime)."""
from __future__ import annotations

from typing import Callable

import click

from elite_export.runtime.requests import (DEFAULT_GUIDANCE, DEFAULT_LAMBDA, DEFAULT_STEPS, MODES,
                                           WORD_CHOICES, GenerationSettings)
from elite_export.runtime.schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES


def sampling_options(fn: Callable) -> Callable:
    """--mode --words --lambda --scheduler --steps --guidance --seed --height --width."""
    opts = [
        click.option("--mode", type=click.Choice(MODES), default="local", show_default=True,
                     help="local: word w0 + the local branch (object detail); global: words only."),
        click.option("--words", type=click.Choice(WORD_CHOICES), default="all", show_default=True,
                     help="Global mode: inject all five words or one of them (0 = shallowest)."),
        click.option("--lambda", "lam", type=float, multiple=True,
                     help=f"Local branch weight (default {DEFAULT_LAMBDA}, the paper's; 0.6 for editing prompts). "
                          "Repeat to give one per concept when composing several."),
        click.option("--scheduler", type=click.Choice(SCHEDULER_NAMES), default=DEFAULT_SCHEDULER, show_default=True,
                     help="lms is the paper's sampler."),
        click.option("--steps", type=int, default=DEFAULT_STEPS, show_default=True),
        click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True,
                     help="Classifier-free guidance scale."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Noise seed: torch.randn on the CPU, as the authors draw it."),
        click.option("--height", type=int, default=512, show_default=True, help="Pixels, a multiple of 64."),
        click.option("--width", type=int, default=512, show_default=True, help="Pixels, a multiple of 64."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def lambdas(values: tuple[float, ...]) -> float | list[float] | None:
    """--lambda values -> Request.lams: none (the default for every concept), one for all, or one per concept."""
    return None if not values else values[0] if len(values) == 1 else list(values)


def settings_from(scheduler: str, steps: int, guidance: float, height: int, width: int) -> GenerationSettings:
    return GenerationSettings(scheduler=scheduler, steps=steps, guidance=guidance, height=height, width=width)
