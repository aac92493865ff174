"""Load the released checkpoints (SD 1.x diffusers folder, CLIP vision folder, ELITE mapper .pt
files) into the PyTorch reference, turning every kind of bad input into one EliteError line."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from elite_export.attention import cross_attention_layers, install_elite_attention
from elite_export.errors import EliteError
from elite_export.mappers import FEATURE_LAYERS, GlobalMapper, LocalMapper
from elite_export.runtime.bundle import hash_file_into
from elite_export.text_injection import InjectedTextEncoder

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CheckpointPaths:
    sd: str
    image_encoder: str
    global_mapper: str
    local_mapper: str | None = None

    def check(self) -> None:
        if not os.path.isdir(self.sd):
            raise EliteError(f"--sd {self.sd!r} is not a folder; give a Stable Diffusion 1.x folder in diffusers format")
        missing = [s for s in SD_SUBFOLDERS if not os.path.isdir(os.path.join(self.sd, s))]
        if missing:
            raise EliteError(f"--sd {self.sd!r} has no {missing[0]}/ subfolder; it must be a diffusers-format "
                             f"SD folder with {', '.join(s + '/' for s in SD_SUBFOLDERS)}")
        if not os.path.isfile(os.path.join(self.image_encoder, "config.json")):
            raise EliteError(f"--image-encoder {self.image_encoder!r} has no config.json; give a CLIP vision "
                             "model folder in transformers format (e.g. clip-vit-large-patch14)")
        for flag, path in (("--global-mapper", self.global_mapper), ("--local-mapper", self.local_mapper)):
            if path is not None and not os.path.isfile(path):
                raise EliteError(f"{flag} {path!r} does not exist")

    def sources(self) -> dict[str, dict]:
        """Each checkpoint's path and sha256 (of every file under it), for the bundle manifest."""
        out = {}
        for name, path in (("sd", self.sd), ("image_encoder", self.image_encoder),
                           ("global_mapper", self.global_mapper), ("local_mapper", self.local_mapper)):
            if path is not None:
                out[name] = {"path": os.path.abspath(path), "sha256": tree_sha256(path)}
        return out


def tree_sha256(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        h.update(os.path.relpath(f, path).encode())
        hash_file_into(h, f)
    return h.hexdigest()


@dataclass
class MapperCheckpoint:
    """A mapper .pt split into the mapper's own state and the per-attn2 K/V projections."""
    mapper_state: dict[str, torch.Tensor]
    kv: dict[str, KV] = field(default_factory=dict)  # attn2 module path -> (to_k [inner,D], to_v [inner,D])

    @property
    def dims(self) -> tuple[int, int, int]:  # (d_in, hidden, d_out)
        first, last = self.mapper_state["mapping_0.0.weight"], self.mapper_state["mapping_0.6.weight"]
        return first.shape[1], first.shape[0], last.shape[0]


def read_mapper(path: str, flag: str, layers: list[str]) -> MapperCheckpoint:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise EliteError(f"{flag} {path!r} is not a PyTorch checkpoint ({type(e).__name__})") from None
    return split_mapper_state(state, f"{flag} {path!r}", layers)


def split_mapper_state(state: object, what: str, layers: list[str]) -> MapperCheckpoint:
    """A mapper checkpoint's state_dict (`what` names it in errors) -> mapper state + per-layer K/V."""
    if not isinstance(state, dict) or "mapping_0.0.weight" not in state or "mapping_0.6.weight" not in state:
        raise EliteError(f"{what} is not an ELITE mapper: expected a state_dict with keys "
                         "mapping_{i}.* and mapping_patch_{i}.* (the authors' global_mapper.pt / local_mapper.pt)")
    mapper_state = {k: v for k, v in state.items() if k.startswith("mapping_")}
    kv_state = {k: v for k, v in state.items() if not k.startswith("mapping_")}
    expected = {f"{p.replace('.', '_')}_to_{w}.weight": (p, i) for p in layers for i, w in enumerate("kv")}
    missing = [k for k in expected if k not in kv_state]
    unexpected = [k for k in kv_state if k not in expected]
    if missing or unexpected:
        parts = ([f"first missing key {missing[0]!r} ({len(missing)} missing)"] if missing else []) + \
                ([f"first unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"] if unexpected else [])
        raise EliteError(f"{what} does not match this UNet's {len(layers)} cross-attention layers: "
                         f"{'; '.join(parts)}; was it trained for another Stable Diffusion version?")
    pairs: dict[str, list[torch.Tensor]] = {p: [torch.empty(0), torch.empty(0)] for p in layers}
    for key, (p, i) in expected.items():
        pairs[p][i] = kv_state[key].float()
    return MapperCheckpoint(mapper_state, {p: (k, v) for p, (k, v) in pairs.items()})


def check_kv_shapes(ckpt: MapperCheckpoint, unet: nn.Module, flag: str) -> None:
    for path, (k, _v) in ckpt.kv.items():
        want = tuple(unet.get_submodule(path).to_k.weight.shape)
        if tuple(k.shape) != want:
            raise EliteError(f"{flag}: {path} to_k is {tuple(k.shape)} but this UNet's layer is {want} "
                             "(inner dim x cross-attention dim); the mapper belongs to another model")


def build_mapper(cls: type, ckpt: MapperCheckpoint, flag: str, vision_dim: int, text_dim: int) -> nn.Module:
    d_in, hidden, d_out = ckpt.dims
    if d_in != vision_dim:
        raise EliteError(f"{flag} takes {d_in}-dim image features but the image encoder's hidden size is "
                         f"{vision_dim}; use the CLIP vision model the mapper was trained with")
    if d_out != text_dim:
        raise EliteError(f"{flag} makes {d_out}-dim words but the text encoder's hidden size is {text_dim}")
    mapper = cls(d_in, d_out, hidden)
    try:
        mapper.load_state_dict(ckpt.mapper_state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise EliteError(f"{flag} has a malformed mapper: {detail.strip()}") from None
    return mapper.eval()


@dataclass
class EliteModels:
    unet: nn.Module
    vae: nn.Module
    text_encoder: InjectedTextEncoder
    tokenizer: object  # transformers CLIPTokenizer
    vision: nn.Module
    global_mapper: GlobalMapper
    local_mapper: LocalMapper | None
    paths: CheckpointPaths | None  # None: made in memory (sd14.random_sd14_models)

    @property
    def text_dim(self) -> int:
        return self.text_encoder.embeddings.token_embedding.weight.shape[1]

    def to(self, device: str | torch.device, dtype: torch.dtype) -> "EliteModels":
        for m in (self.unet, self.vae, self.text_encoder, self.vision, self.global_mapper, self.local_mapper):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self


def quiet_libraries() -> None:
    """diffusers/transformers chatter (accelerate hints, weight-loading bars) is noise for our users."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def load_models(paths: CheckpointPaths, attention: str = "formula") -> EliteModels:
    """The PyTorch reference from the four checkpoints (fp32, CPU; see EliteModels.to)."""
    paths.check()
    quiet_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    def load(what: str, fn, *args, **kw):
        try:
            return fn(*args, local_files_only=True, **kw)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise EliteError(f"cannot load the {what} ({str(e).splitlines()[0]})") from None

    sd = paths.sd

    def safetensors(sub: str) -> bool:  # released SD 1.4 folders hold .bin files, newer ones .safetensors
        return any(f.endswith(".safetensors") for f in os.listdir(os.path.join(sd, sub)))

    unet = load("UNet from --sd", UNet2DConditionModel.from_pretrained, sd, subfolder="unet",
                use_safetensors=safetensors("unet")).eval()
    vae = load("VAE from --sd", AutoencoderKL.from_pretrained, sd, subfolder="vae",
               use_safetensors=safetensors("vae")).eval()
    text = load("text encoder from --sd", CLIPTextModel.from_pretrained, sd, subfolder="text_encoder").eval()
    tokenizer = load("tokenizer from --sd", CLIPTokenizer.from_pretrained, sd, subfolder="tokenizer")
    vision = load("image encoder", CLIPVisionModel.from_pretrained, paths.image_encoder).eval()
    return assemble_models(unet, vae, text, tokenizer, vision, paths.global_mapper, paths.local_mapper, paths,
                           attention)


MapperSource = str | dict  # a mapper checkpoint's path, or its state_dict


def mapper_checkpoint(source: MapperSource, flag: str, layers: list[str]) -> MapperCheckpoint:
    if isinstance(source, str):
        return read_mapper(source, flag, layers)
    return split_mapper_state(source, flag, layers)


def assemble_models(unet: nn.Module, vae: nn.Module, text: nn.Module, tokenizer, vision: nn.Module,
                    global_mapper_source: MapperSource, local_mapper_source: MapperSource | None,
                    paths: CheckpointPaths | None, attention: str = "formula") -> EliteModels:
    """EliteModels from loaded networks and the mappers' checkpoints (no local mapper: global mode only)."""
    layers = cross_attention_layers(unet)
    vision_cfg, text_dim = vision.config, text.config.hidden_size
    if vision_cfg.num_hidden_layers < max(FEATURE_LAYERS):
        raise EliteError(f"the image encoder has {vision_cfg.num_hidden_layers} layers; ELITE reads hidden "
                         f"state {max(FEATURE_LAYERS)}, so it needs at least that many (CLIP ViT-L/14 has 24)")
    if unet.config.cross_attention_dim != text_dim:
        raise EliteError(f"the UNet's cross-attention dim is {unet.config.cross_attention_dim} but the text "
                         f"encoder's hidden size is {text_dim}; --sd folders must come from one model")
    g = mapper_checkpoint(global_mapper_source, "--global-mapper", layers)
    check_kv_shapes(g, unet, "--global-mapper")
    global_mapper = build_mapper(GlobalMapper, g, "--global-mapper", vision_cfg.hidden_size, text_dim)
    local_mapper, local_kv = None, None
    if local_mapper_source is not None:
        lc = mapper_checkpoint(local_mapper_source, "--local-mapper", layers)
        check_kv_shapes(lc, unet, "--local-mapper")
        local_mapper = build_mapper(LocalMapper, lc, "--local-mapper", vision_cfg.hidden_size, text_dim)
        local_kv = lc.kv
    install_elite_attention(unet, g.kv, local_kv, attention)
    return EliteModels(unet, vae, InjectedTextEncoder(text).eval(), tokenizer, vision, global_mapper,
                       local_mapper, paths)
