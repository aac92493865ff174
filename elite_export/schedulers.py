"""The PyTorch reference's schedulers: the diffusers twin of each runtime scheduler name.

The names, diffusers classes and kwargs live in elite_export.runtime.schedulers.SCHEDULERS, which the
torch-free runtime mirrors; this module only instantiates them.
"""
from __future__ import annotations

from typing import Any, Mapping

import diffusers

from elite_export.runtime.schedulers import schedule_config, scheduler_spec


def make_diffusers_scheduler(name: str, config: Mapping[str, Any]) -> Any:
    """The diffusers scheduler (a SchedulerMixin) `name` on the training schedule `config`; call
    set_timesteps next."""
    spec = scheduler_spec(name)
    return getattr(diffusers, spec.diffusers_class)(**schedule_config(config), **spec.diffusers_kwargs)
