"""The calibration set: prompts and concept images that precision choices are judged on (torch-free).

`elite-export check --calib` sweeps every graph through it and reports the worst case per graph
and output; the fp32-island choice (export.Fp16Policy) and later INT8/FP8 calibration are judged
on the same set.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class CalibrationSet:
    generation_prompts: tuple[str, ...]
    editing_prompts: tuple[str, ...]
    concepts: tuple[tuple[str, str], ...]  # (image path, mask path)
    timesteps: tuple[int, ...]

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.generation_prompts + self.editing_prompts


def mask_for(image: str) -> str:
    return os.path.splitext(image)[0] + "_bg.png"


def calibration_set() -> CalibrationSet:
    with open(os.path.join(HERE, "set.json")) as f:
        d = json.load(f)
    concepts = tuple((os.path.join(HERE, "concepts", c), mask_for(os.path.join(HERE, "concepts", c)))
                     for c in d["concepts"])
    return CalibrationSet(tuple(d["generation_prompts"]), tuple(d["editing_prompts"]), concepts,
                          tuple(d["timesteps"]))
