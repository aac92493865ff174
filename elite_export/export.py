"""torch module + GraphSpec -> ONNX file, in small passes that can each be switched off.

    export_onnx     torch.onnx.export(dynamo=True): ~2.5x smaller graphs than TorchScript, converts
                    to fp16 cleanly, and records each node's module class (used by the fp16 policy)
    name_io_dims    graph I/O dims named by the spec's symbols (B, h, w, K, ...)
    fold_constants  onnx-graphsurgeon constant folding + dead-node cleanup
    check           onnx.checker + shape inference (path-based: works past 2 GB)
    to_fp16         fp16 weights and math for TensorRT, with fp32 islands per Fp16Policy, fp32 I/O
    ort_fusion      fp32 graphs for ONNX Runtime only: attention -> com.microsoft.MultiHeadAttention
                    (ort_fusion.py; bundle_build applies it after converting the fp16 graph unfused)
    cuda variant    fp16 graphs for ONNX Runtime's CUDA provider, fused (cuda_variant.py)

Graphs over 2 GB (the SD 1.4 UNet in fp32 is ~3.4 GB) are written with their weights in one
external-data file beside them (`<name>.onnx.data`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import onnx
import torch
from google.protobuf.message import EncodeError

from elite_export.specs import GraphSpec, ShapeRanges

PROTOBUF_LIMIT = 2_000_000_000


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 18  # TensorRT 10's parser covers opsets 9-20
    fold_constants: bool = True
    check: bool = True
    ort_fusion: bool = True  # fp32 graphs (ONNX Runtime) only; fp16 graphs stay unfused for TensorRT


@dataclass(frozen=True)
class Fp16Policy:
    """What stays fp32 in fp16 graphs (as ModelOpt's AutoCast / onnxruntime's force_fp32_ops).

    fp32_ops: op types whose accumulation overflows or loses too much in fp16 (softmax, the
    statistics of LayerNorm and GroupNorm (exported as InstanceNormalization)).
    fp32_modules: torch module classes whose every node stays fp32: ELITE's m / max m, and the UNet's
    sinusoidal timestep embedding (t * freq reaches 999 rad, where fp16's spacing is 0.5: diffusers
    computes it in fp32 in fp16 models too, and casts after)."""
    fp32_ops: tuple[str, ...] = ("Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization")
    fp32_modules: tuple[str, ...] = ("elite_export.engines.attention_op.LocalScale",
                                     "diffusers.models.embeddings.Timesteps")

    def to_dict(self) -> dict:
        return {"fp32_ops": list(self.fp32_ops), "fp32_modules": list(self.fp32_modules)}


def example_dims(spec: GraphSpec, ranges: ShapeRanges) -> dict[str, int]:
    """Trace inputs: the opt size and a batch (and concept count) of >= 2 where it is dynamic (avoids 0/1
    specialisation)."""
    batch = ranges.batch[1] if ranges.batch[0] == ranges.batch[2] else max(2, ranges.batch[1])
    lo, opt, hi = ranges.concepts
    concepts = opt if lo == hi else min(max(2, opt), hi)
    size = ranges.size[1]
    if ranges.size[0] != ranges.size[2] and size // spec.model.size_multiple < 2:
        size = ranges.size[2]  # one block of latent would be specialised away as well
    return spec.dims(batch, size, size, spec.k_range[1], concepts)


def dynamic_shapes(spec: GraphSpec, ranges: ShapeRanges) -> dict[str, dict[int, object]]:
    """torch.export dynamic_shapes keyed by argument name, from the spec's varying symbols."""
    from torch.export import Dim

    m = spec.model
    f, lm = spec.batch_factor, m.latent_multiple
    blocks = (ranges.size[0] // m.size_multiple, ranges.size[2] // m.size_multiple)
    axes = spec.dynamic_axes(ranges)
    varying = {s for a in axes.values() for s in a.values()}
    dims = {}
    if "R" in varying and any("R" in t.shape for t in spec.inputs):  # requests R, graph batch B = f R
        dims["R"] = Dim("R", min=ranges.batch[0], max=ranges.batch[2])
        dims["B"] = dims["R"] * f if f > 1 else dims["R"]
    elif "B" in varying:
        dims["B"] = Dim("B", min=ranges.batch[0] * f, max=ranges.batch[2] * f)
    if "h" in varying:
        dims["h"] = Dim("h_blocks", min=blocks[0], max=blocks[1]) * lm
        dims["w"] = Dim("w_blocks", min=blocks[0], max=blocks[1]) * lm
    if "K" in varying:
        dims["K"] = Dim("K", min=spec.k_range[0], max=spec.k_range[2])
    if "NC" in varying:
        dims["NC"] = Dim("NC", min=ranges.concepts[0], max=ranges.concepts[2])
    return {t.name: {i: dims[s] for i, s in axes[t.name].items()} for t in spec.inputs}


def too_big_for_protobuf(model: onnx.ModelProto) -> bool:
    """Past 2 GB a proto cannot be serialized whole; upb's ByteSize() then raises EncodeError."""
    try:
        size = model.ByteSize()
    except EncodeError:
        return True
    return size < 0 or size > PROTOBUF_LIMIT


def save(model: onnx.ModelProto, path: str) -> None:
    """Write `model`; weights go to one `<file>.data` beside it when the graph passes 2 GB."""
    data = os.path.basename(path) + ".data"
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    big = too_big_for_protobuf(model)
    onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)


def export_onnx(module: torch.nn.Module, spec: GraphSpec, ranges: ShapeRanges, path: str,
                settings: ExportSettings = ExportSettings()) -> None:
    """The dynamo export of `module` with the spec's names and (unless static) dynamic axes."""
    dims = example_dims(spec, ranges)
    args = tuple(torch.from_numpy(a) for a in spec.sample_inputs(dims).values())
    dyn = dynamic_shapes(spec, ranges)  # static ranges still leave the text encoder's K dynamic
    dyn = dyn if any(dyn.values()) else None
    from elite_export.plugin_export import translation_table

    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dyn, opset_version=settings.opset, verbose=False,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            custom_translation_table=translation_table())  # --attention plugin: ELITE attn2 as one node
    model = program.model_proto
    name_nodes_by_module(model)
    name_io_dims(model, spec, ranges)
    save(model, path)
    if settings.fold_constants:
        fold_constants(path)
    if settings.check:
        check(path)


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's chatter (torchvision ops it skips, deprecation and axis-naming warnings) is not ours."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def name_io_dims(model: onnx.ModelProto, spec: GraphSpec, ranges: ShapeRanges) -> None:
    """Rename the graph I/O's dynamic dims to the spec's symbols (B, R, h, w, Y, X, K, NC)."""
    axes = spec.dynamic_axes(ranges)
    for vi in list(model.graph.input) + list(model.graph.output):
        for i, sym in axes.get(vi.name, {}).items():
            vi.type.tensor_type.shape.dim[i].dim_param = sym


def name_nodes_by_module(model: onnx.ModelProto) -> None:
    """Prefix each node's name with the torch module class it was traced in ("pkg.Class/name").

    Node metadata does not survive graph rewrites (constant folding); names do, so the fp16 pass
    finds the nodes of Fp16Policy.fp32_modules by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        hierarchy = [c.strip(" '") for c in meta.get("pkg.torch.onnx.class_hierarchy", "").strip("[]").split(",")]
        modules = [c for c in hierarchy if c and not c.startswith(("aten.", "prims.", "<built-in"))]
        name = f"{modules[-1] if modules else 'graph'}/{node.name or node.op_type}"
        node.name = name if name not in seen else f"{name}#{i}"
        seen.add(node.name)


def fold_constants(path: str) -> None:
    save(tidy(onnx.load(path), fold=True), path)


def tidy(model: onnx.ModelProto, fold: bool = False) -> onnx.ModelProto:
    """onnx-graphsurgeon: (constant folding,) dead-node cleanup, topological order."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    if fold:
        graph.fold_constants()
    return gs.export_onnx(graph.cleanup().toposort())


def check(path: str) -> None:
    """onnx.checker (full check) and strict shape inference; both by path so > 2 GB works."""
    from elite_export.plugin_export import register_schema

    register_schema()  # the plugin node's schema, for graphs exported with --attention plugin
    onnx.checker.check_model(path, full_check=True)


def blocked_nodes(model: onnx.ModelProto, fp32_modules: tuple[str, ...]) -> list[str]:
    """Names of nodes traced inside any of `fp32_modules` (see name_nodes_by_module)."""
    return [n.name for n in model.graph.node if n.name.split("/", 1)[0] in fp32_modules]


def to_fp16(src: str, dst: str, policy: Fp16Policy = Fp16Policy()) -> None:
    """fp32 ONNX -> fp16 ONNX with fp32 islands and fp32 graph I/O (casts inside)."""
    save(fp16_model(onnx.load(src), policy), dst)
    check(dst)


def skip_fp16_round_trips(model: onnx.ModelProto) -> None:
    """fp32 -> Cast(fp16) -> Cast(fp32) -> reader  =>  fp32 -> reader (in place).

    The converter casts every blocked node's output to fp16 and back before the next blocked node
    (and the fp32 graph inputs to fp16 and back before a blocked first node), so an fp32 island of
    several nodes would round its every intermediate to fp16 (m / max m: m underflowing to 0 again;
    the timestep embedding: 999 rad at fp16's 0.5 spacing). The readers take the fp32 tensor itself;
    the dead casts go in `tidy`."""
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    fp32 = {v.name for v in [*model.graph.value_info, *model.graph.input]
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}

    def cast_to(node, to: int) -> bool:
        return node is not None and node.op_type == "Cast" and next(a.i for a in node.attribute if a.name == "to") == to

    replace: dict[str, str] = {}
    for n in model.graph.node:
        first = producer.get(n.input[0]) if cast_to(n, onnx.TensorProto.FLOAT) else None
        if cast_to(first, onnx.TensorProto.FLOAT16) and n.output[0] not in graph_outputs and first.input[0] in fp32:
            replace[n.output[0]] = first.input[0]  # a tensor known to be fp32 (value_info or graph input)
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            if name in replace:
                n.input[k] = replace[name]


def fp16_model(model: onnx.ModelProto, policy: Fp16Policy) -> onnx.ModelProto:
    """The fp16 conversion of a loaded fp32 model (weights in memory): fp32 islands per `policy`, fp32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from elite_export.plugin_export import keep_m_fp32

    block = blocked_nodes(model, policy.fp32_modules)
    big = too_big_for_protobuf(model)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(policy.fp32_ops),
                                     node_block_list=block, disable_shape_infer=big)
    skip_fp16_round_trips(model)
    keep_m_fp32(model)
    return tidy(model)  # the converter appends its casts out of order

