"""Concept image + object mask -> the three tensors ELITE's concept encoder reads (numpy + PIL only).

As the authors' CustomDatasetWithBG: the object image is image * (mask > 0) taken at full size;
both images are resized to 224x224 with PIL bicubic and CLIP-normalised; the mask is resized by
nearest neighbour to 128x128 (torch's legacy 'nearest': src = floor(dst * in/out) in float32) and
then to 16x16, one value per CLIP patch.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

from elite_export.errors import EliteError

CLIP_SIZE = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MASK_STAGES = (128, 16)  # the authors' two nearest-neighbour resizes

Source = Union[str, bytes]  # a file's path, or its bytes (an HTTP upload)


@dataclass
class ConceptInputs:
    pixels: np.ndarray  # [3,224,224] float32, CLIP-normalised image
    object_pixels: np.ndarray  # [3,224,224] float32, CLIP-normalised image * mask
    mask: np.ndarray  # [256] float32 in {0,1}, the 16x16 patch mask
    id: str = ""  # concept_id(): content hash of the decoded image and mask
    source: str = ""  # the image's path or upload name, for the PNGs' metadata


def concept_id(image: np.ndarray, mask: np.ndarray) -> str:
    """Content hash of a concept: the decoded uint8 [H,W,3] image and bool [H,W] mask (not their file
    encodings: the same pixels saved as PNG or as another PNG give the same id). 32 hex digits."""
    h = hashlib.sha256(b"elite-concept-id/1")
    h.update(np.array(image.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(image, np.uint8).tobytes())
    h.update(np.packbits(np.ascontiguousarray(mask, bool)).tobytes())
    return h.hexdigest()[:32]


def _label(src: Source) -> str:
    return repr(src) if isinstance(src, str) else f"(uploaded, {len(src):,} bytes)"


def _open(src: Source, what: str, max_pixels: int | None = None) -> Image.Image:
    if isinstance(src, str) and not os.path.isfile(src):
        raise EliteError(f"{what} {src!r} does not exist")
    try:
        img = Image.open(src if isinstance(src, str) else io.BytesIO(src))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise EliteError(f"{what} {_label(src)} is {img.width}x{img.height} px, more than the "
                             f"{max_pixels:,} px allowed; send a smaller image")
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", " ".join(str(e).split()))[:200]  # one line
        raise EliteError(f"{what} {_label(src)} is not an image PIL can read ({reason})") from None
    return img


def _to_array(img: Image.Image, path: Source, what: str) -> np.ndarray:
    """Any PIL mode -> uint8 [H,W,C]. 16/32-bit greyscale is scaled to 8 bits, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.repeat(np.round(a / peak * 255.0).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        raise EliteError(f"{what} {_label(path)} is a floating-point image; save it as 8-bit RGB (PNG or JPEG)")
    return np.asarray(img.convert("RGB"))  # L, P, RGBA (alpha dropped, as the authors), CMYK, 1 ...


def load_image(path: Source, max_pixels: int | None = None) -> np.ndarray:
    """Concept image (path or bytes) -> uint8 [H,W,3]."""
    return _to_array(_open(path, "image", max_pixels), path, "image")


def load_mask(path: Source, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Mask (path or bytes) -> bool [H,W]; any value > 0 in any channel is object. size: the image's (H, W)."""
    arr = _to_array(_open(path, "mask", max_pixels), path, "mask")
    if arr.shape[:2] != tuple(size):
        raise EliteError(f"mask {_label(path)} is {arr.shape[1]}x{arr.shape[0]} but the image is "
                         f"{size[1]}x{size[0]}; give the mask of this image (same width and height)")
    mask = arr.max(axis=2) > 0
    if not mask.any():
        raise EliteError(f"mask {_label(path)} is empty (all zero); white (> 0) must mark the object")
    return mask


def nearest_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode='nearest') on a 2-D array, bit-exact index arithmetic."""
    def src(n_in: int) -> np.ndarray:
        if n_in == size:
            return np.arange(size)
        scale = np.float32(n_in) / np.float32(size)
        return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    return mask[src(mask.shape[0])][:, src(mask.shape[1])]


def clip_normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] -> bicubic 224x224, /255, CLIP mean/std -> float32 [3,224,224]."""
    small = Image.fromarray(rgb).resize((CLIP_SIZE, CLIP_SIZE), resample=Image.Resampling.BICUBIC)
    x = np.asarray(small).astype(np.float32) / np.float32(255)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).copy()


def patch_mask(mask: np.ndarray) -> np.ndarray:
    """bool [H,W] -> float32 [256]: the authors' 128x128 then 16x16 nearest resizes."""
    m = mask
    for size in MASK_STAGES:
        m = nearest_resize(m, size)
    return m.astype(np.float32).reshape(-1)


def concept_inputs(image: np.ndarray, mask: np.ndarray, source: str = "") -> ConceptInputs:
    obj = image * mask[..., None].astype(np.uint8)  # object image, before resizing
    return ConceptInputs(clip_normalize(image), clip_normalize(obj), patch_mask(mask), concept_id(image, mask), source)


def load_concept(image: Source, mask: Source, source: str | None = None,
                 max_pixels: int | None = None) -> ConceptInputs:
    """Image + mask (paths or bytes) -> the concept encoder's inputs. source: the label recorded in the
    PNGs (default: the image's path)."""
    rgb = load_image(image, max_pixels)
    label = source if source is not None else (image if isinstance(image, str) else "")
    return concept_inputs(rgb, load_mask(mask, rgb.shape[:2], max_pixels), label)
