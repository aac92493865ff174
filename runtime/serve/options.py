"""The service's settings: `elite-run serve` options, or the `args:` of a Ray Serve config file."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from elite_export.errors import EliteError

PRECISIONS = ("auto", "fp32", "fp16", "cuda")  # elite-run's --precision


@dataclass
class ServeOptions:
    bundle: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 0  # onnxruntime intra-op threads per replica (0: its choice)
    precision: str = "auto"  # which of the bundle's graphs onnxruntime runs: auto | fp32 | fp16 | cuda
    cuda_graph: bool = False  # replay the UNet step as a CUDA graph (static bundles, --device cuda)
    replicas: int = 1
    max_batch: int = 0  # images per pipeline call; 0: the bundle's max
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    max_queue: int = 16  # images admitted and waiting per replica (beyond the running batch); more: 503
    timeout_s: float = 300.0  # per HTTP request, from its arrival at a replica; longer: 504
    concept_cache: int = 128  # encoded concepts each replica keeps (LRU)
    concept_store: int = 256  # .concept files kept for all replicas (LRU), so an id works on any replica
    max_upload_mb: float = 16.0  # request body
    max_pixels: int = 4096 * 4096  # per uploaded image
    max_images: int = 16  # per request: prompts x n
    warmup: bool = True

    @classmethod
    def from_args(cls, args: dict) -> "ServeOptions":
        """From a config file's `args:` (or `serve run module:build key=value`, where values are strings)."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise EliteError(f"unknown service option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if "bundle" not in args:
            raise EliteError("the service needs `bundle` (the bundle folder from `elite-export build`)")
        out = {}
        for name, value in args.items():
            kind = known[name]
            try:
                if kind == "bool" and isinstance(value, str):
                    out[name] = value.lower() in ("1", "true", "yes", "on")
                else:
                    out[name] = {"int": int, "float": float, "str": str, "bool": bool}[kind](value)
            except ValueError:
                raise EliteError(f"service option {name}={value!r} is not a valid {kind}") from None
        return cls(**out)

    def check(self, bundle_max_batch: int) -> None:
        from elite_export.runtime.backends import BACKENDS

        if self.backend not in BACKENDS:
            raise EliteError(f"the service runs --backend {' or '.join(BACKENDS)}, not {self.backend!r}")
        if self.device not in ("cpu", "cuda"):
            raise EliteError(f"--device must be cpu or cuda, not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise EliteError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        for name, lo in (("replicas", 1), ("max_queue", 1), ("concept_cache", 1), ("concept_store", 1),
                         ("max_images", 1), ("threads", 0), ("max_batch", 0), ("max_pixels", 1)):
            if getattr(self, name) < lo:
                raise EliteError(f"--{name.replace('_', '-')} must be at least {lo}, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "timeout_s", "max_upload_mb"):
            v = getattr(self, name)
            if not 0 <= v < float("inf") or (name != "batch_wait_ms" and v == 0):
                raise EliteError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        if self.max_batch > bundle_max_batch:
            raise EliteError(f"--max-batch {self.max_batch} is more than this bundle takes ({bundle_max_batch}); "
                             "rebuild it with a larger --batch")

    def batch(self, bundle_max_batch: int) -> int:
        return self.max_batch or bundle_max_batch

    def to_dict(self) -> dict:
        return asdict(self)
