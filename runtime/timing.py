"""Per-stage wall-clock accounting for the stage table (concept encoder, text encoder, UNet x steps, VAE)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float, calls: int = 1) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + calls

    def merge(self, other: "StageTimer") -> None:
        for name, s in other.seconds.items():
            self.add(name, s, other.calls[name])

    def rows(self, images: int) -> list[list]:
        """[stage, calls, total ms, ms per call, share of total] rows, then total and images/s.

        "step" (a whole denoising step) is shown as what it adds to the UNet: the scheduler, the
        guidance mix and the copies, i.e. the runtime's own overhead per step."""
        total = self.seconds.get("total", sum(v for k, v in self.seconds.items() if k != "total"))
        shown = {k: (v, self.calls[k]) for k, v in self.seconds.items() if k not in ("total", "step")}
        if "step" in self.seconds:
            shown["step overhead"] = (self.seconds["step"] - self.seconds.get("unet", 0.0), self.calls["step"])
        rows = [[k, n, v * 1e3, v * 1e3 / n, f"{100 * v / total:.1f}%" if total else "-"]
                for k, (v, n) in shown.items()]
        rows.append(["total", 1, total * 1e3, total * 1e3, "100%"])
        rows.append(["images/s", images, "", images / total if total else 0.0, ""])
        return rows

    def to_dict(self, images: int) -> dict:
        total = self.seconds.get("total", 0.0)
        return {"stages": {k: {"seconds": v, "calls": self.calls[k]} for k, v in self.seconds.items()},
                "images": images, "images_per_second": images / total if total else None}


STAGE_HEADERS = ["stage", "calls", "total ms", "ms/call", "share"]
