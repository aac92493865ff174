"""Click options of the export side shared by several `elite-export` commands."""
from __future__ import annotations

from typing import Callable

import click


def checkpoint_options(fn: Callable) -> Callable:
    """--sd --image-encoder --global-mapper --local-mapper: the released checkpoints."""
    opts = [
        click.option("--sd", type=click.Path(), help="Stable Diffusion 1.4 folder in diffusers format."),
        click.option("--image-encoder", type=click.Path(),
                     help="CLIP vision folder in transformers format (clip-vit-large-patch14)."),
        click.option("--global-mapper", type=click.Path(), help="The authors' global_mapper.pt."),
        click.option("--local-mapper", type=click.Path(), default=None,
                     help="The authors' local_mapper.pt (needed for --mode local)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def checkpoint_paths(sd, image_encoder, global_mapper, local_mapper):
    from elite_export.checkpoints import CheckpointPaths
    from elite_export.errors import EliteError

    for flag, v in (("--sd", sd), ("--image-encoder", image_encoder), ("--global-mapper", global_mapper)):
        if v is None:
            raise EliteError(f"{flag} is required (or make a tiny model with `elite-export toy DIR`)")
    return CheckpointPaths(sd, image_encoder, global_mapper, local_mapper)
