"""fp16 TensorRT engines from the bundle's fp16 ONNX graphs, one stage at a time:

    require_tensorrt -> parse (strongly typed) -> profile from the spec -> config -> timing cache
    -> build_serialized_network -> timing cache merged back -> engine bytes in the cache

The TensorRT builder is driven directly rather than through Polygraphy's loaders: what this needs
(a strongly typed network, one profile, a timing cache merged under a lock shared by concurrent
builds, the attention plugin registered before parsing) is a few calls, and this way nothing
between us and TensorRT 10/11 has to track their API changes. Polygraphy stays the tool for
inspecting and comparing graphs (tests, scripts).

Strongly typed: precision comes from the ONNX tensor types (fp16 with fp32 islands), so no FP16
builder flag is set. TensorRT 10 has the STRONGLY_TYPED creation flag and builds explicit-batch
networks by default; TensorRT 11 builds every network strongly typed and explicitly batched (the
flags are set only where they exist). tensorrt is imported inside functions only.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Callable

from elite_export.engines.attention_plugin_spec import PLUGIN_NAMESPACE, PLUGIN_OP_NAME, PLUGIN_VERSION
from elite_export.engines.cache import (CacheEntry, EngineCache, EngineKey, OnnxFingerprint, Profile, atomic_write,
                                        file_lock)
from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle
from elite_export.runtime.cuda_device import current_device
from elite_export.specs import GRAPH_NAMES, GraphSpec, ShapeRanges

if TYPE_CHECKING:
    import tensorrt as trt

TRT_HINT = "TensorRT is not installed: pip install 'elite-export[trt]' on a host with NVIDIA's index and a GPU"
PLUGIN_SOURCES = ("attention_kernel.py", "attention_plugin_trt.py", "attention_plugin_spec.py")


@dataclass(frozen=True)
class TrtBuildSettings:
    optimization_level: int = 3  # TensorRT's builder optimization level, 0 (fast build) .. 5
    workspace_mib: int | None = None  # cap on the tactic workspace; None: TensorRT's default (the GPU's memory)
    refittable: bool = False  # BuilderFlag.REFIT: weights can be swapped without a rebuild
    static_shapes: bool = False  # build for the opt batch and size only (min = opt = max): CUDA graphs
    timing_cache: str | None = None  # None: timing-trt<version>-sm<cc>.cache beside the engine

    def check(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise EliteError(f"builder optimization level {self.optimization_level} is not in 0..5")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise EliteError(f"workspace limit {self.workspace_mib} MiB must be positive")

    def key_items(self) -> tuple[tuple[str, object], ...]:
        """Every setting that shapes the engine: all but where the timing cache lives."""
        return (("optimization_level", self.optimization_level), ("workspace_mib", self.workspace_mib),
                ("refittable", self.refittable), ("static_shapes", self.static_shapes))


def engine_profile(spec: GraphSpec, ranges: ShapeRanges, static: bool) -> Profile:
    """{input: (min, opt, max)} from the spec; static keeps only the opt batch, size and concept count
    (K keeps its range: the text encoder serves both K = 1 and K = 5)."""
    if static:
        ranges = ranges.at_opt()
    return spec.profile(ranges)


def require_tensorrt() -> None:
    """EliteError with the install hint unless the real tensorrt package imports."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the package is there but libnvinfer is not
        raise EliteError(f"{TRT_HINT} ({e})") from None
    if not hasattr(tensorrt, "Builder"):  # tensorrt-stubs alone leave an empty namespace package
        raise EliteError(TRT_HINT)


def uses_attention_plugin(onnx_path: str) -> bool:
    """Whether the graph holds the ELITE cross-attention plugin node (graph only: no weights loaded)."""
    try:
        import onnx
    except ImportError:
        raise EliteError("building engines reads the ONNX graphs: pip install onnx") from None
    model = onnx.load(onnx_path, load_external_data=False)
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return any(n.op_type == PLUGIN_OP_NAME and (n.domain == PLUGIN_NAMESPACE or any(
        a.name == "plugin_namespace" and a.s == PLUGIN_NAMESPACE.encode() for a in n.attribute)) for n in nodes)


def plugin_fingerprint() -> str:
    """What a plugin engine depends on beyond the ONNX: the plugin's sources, version and Triton
    (which compiles its kernel into the engine at build time)."""
    h = hashlib.sha256(f"{PLUGIN_VERSION}|triton {_version('triton')}".encode())
    for name in PLUGIN_SOURCES:
        path = os.path.join(os.path.dirname(__file__), name)
        h.update(open(path, "rb").read() if os.path.isfile(path) else b"absent")
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def register_attention_plugin() -> None:
    try:
        from elite_export.engines.attention_plugin_trt import register_plugin
    except ImportError as e:
        raise EliteError(f"the graph uses the ELITE attention plugin, whose TensorRT registration cannot be "
                         f"imported ({e}): pip install 'elite-export[trt,plugin]'") from None
    register_plugin()


def network_flags(plugin: bool) -> int:
    import tensorrt as trt

    flags = 0
    for name, wanted in (("STRONGLY_TYPED", True), ("PREFER_AOT_PYTHON_PLUGINS", plugin)):
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if wanted and flag is not None:
            flags |= 1 << int(flag)
    return flags


def parse_onnx(network: trt.INetworkDefinition, logger: trt.ILogger, onnx_path: str, spec: GraphSpec) -> None:
    import tensorrt as trt

    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):  # reads external data beside the file
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = (f"node {errors[0].node_name()!r} ({errors[0].node_operator()}): {errors[0].desc()}"
                 if errors else "no error reported")
        raise EliteError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {first}"
                         + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    names = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if names != sorted(t.name for t in spec.inputs):
        raise EliteError(f"{onnx_path} has inputs {names}; the {spec.name} spec declares "
                         f"{sorted(t.name for t in spec.inputs)}: re-export the bundle")


def make_profile(builder: trt.Builder, shapes: Profile) -> trt.IOptimizationProfile:
    import tensorrt as trt

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    return profile


def configure(config: trt.IBuilderConfig, settings: TrtBuildSettings) -> None:
    import tensorrt as trt

    config.builder_optimization_level = settings.optimization_level
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    if settings.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)


def timing_cache_path(settings: TrtBuildSettings, engine_dir: str, trt_version: str, cc: str) -> str:
    """Timing caches are per TensorRT version and GPU: one file for each, beside the engines."""
    return settings.timing_cache or os.path.join(engine_dir, f"timing-trt{trt_version}-sm{cc.replace('.', '')}.cache")


def read_timing_cache(config: trt.IBuilderConfig, path: str) -> trt.ITimingCache | None:
    """The timing cache stored at `path`; None when there is none or TensorRT cannot read it."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        return config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - a damaged file: TensorRT raises its own error types
        return None


def load_timing_cache(config: trt.IBuilderConfig, path: str, log: Callable[[str], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with file_lock(path + ".lock", shared=True):
        stored = read_timing_cache(config, path)
    if stored is None or not config.set_timing_cache(stored, ignore_mismatch=False):
        if stored is not None or os.path.isfile(path):
            log(f"timing cache {path} is unreadable or for another GPU or TensorRT: starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def save_timing_cache(config: trt.IBuilderConfig, path: str) -> None:
    """Merge this build's timings into the file (which a concurrent build may have updated since)."""
    ours = config.get_timing_cache()
    with file_lock(path + ".lock"):
        stored = read_timing_cache(config, path)
        if stored is not None and stored.combine(ours, ignore_mismatch=False):
            ours = stored  # else the file is unreadable or another GPU's: ours replaces it
        atomic_write(path, memoryview(ours.serialize()))


def build_engine(onnx_path: str, spec: GraphSpec, ranges: ShapeRanges, settings: TrtBuildSettings,
                 out_path: str, log: Callable[[str], None] = print) -> None:
    """Build the strongly typed engine of one fp16 ONNX graph and write it to `out_path`."""
    settings.check()
    require_tensorrt()
    import tensorrt as trt

    device = current_device()
    plugin = uses_attention_plugin(onnx_path)
    if plugin:
        register_attention_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(plugin))
    parse_onnx(network, logger, onnx_path, spec)
    config = builder.create_builder_config()
    configure(config, settings)
    config.add_optimization_profile(make_profile(builder, engine_profile(spec, ranges, settings.static_shapes)))
    cache_path = timing_cache_path(settings, os.path.dirname(os.path.abspath(out_path)), trt.__version__,
                                   device.compute_capability)
    load_timing_cache(config, cache_path, log)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EliteError(f"TensorRT could not build the {spec.name} engine from {onnx_path} (its log is above)")
    seconds = time.perf_counter() - start
    save_timing_cache(config, cache_path)
    with open(out_path, "wb") as f:
        f.write(plan)
    log(f"{spec.name}: built a TensorRT {trt.__version__} engine for {device.name} (sm {device.compute_capability}) "
        f"in {seconds:.1f} s, {plan.nbytes / 2**20:.1f} MiB")


def engine_key(bundle: Bundle, name: str, settings: TrtBuildSettings, trt_version: str, cc: str) -> EngineKey:
    """The cache key of graph `name`'s engine in `bundle` for this TensorRT and GPU."""
    path = bundle.graph_path(name, "fp16")
    return EngineKey(name, OnnxFingerprint.from_manifest(bundle.graph_file(name, "fp16")), settings.key_items(),
                     engine_profile(bundle.spec(name), bundle.ranges, settings.static_shapes), trt_version, cc,
                     plugin_fingerprint() if uses_attention_plugin(path) else None)


def build_bundle_engines(bundle: Bundle, settings: TrtBuildSettings, names: tuple[str, ...] = GRAPH_NAMES,
                         log: Callable[[str], None] = print) -> dict[str, CacheEntry]:
    """Engines for the bundle's fp16 graphs in BUNDLE/engines, built or reused from the cache.
    Returns {graph: entry}; `entry.to_manifest(bundle.root)` is what the manifest records."""
    settings.check()
    require_tensorrt()
    import tensorrt as trt

    device = current_device()
    problems = bundle.verify(names, "fp16")
    if problems:
        raise EliteError(f"bundle {bundle.root!r}: {problems[0]}; rebuild the bundle")
    cache = EngineCache(bundle.path("engines"))
    entries = {}
    for name in names:
        key = engine_key(bundle, name, settings, trt.__version__, device.compute_capability)
        build = functools.partial(build_engine, bundle.graph_path(name, "fp16"), bundle.spec(name), bundle.ranges,
                                  settings, log=log)
        entries[name] = cache.get_or_build(key, build, log)
    return entries
