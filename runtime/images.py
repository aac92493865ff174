"""Writing images: PNGs whose text metadata holds every setting needed to reproduce them."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
from PIL import Image, PngImagePlugin


def save_png(path: str, image: np.ndarray, meta: dict) -> None:
    """uint8 [H,W,3] -> PNG with an `elite` JSON text chunk; written to a temp file, then renamed."""
    info = PngImagePlugin.PngInfo()
    info.add_text("elite", json.dumps(meta, sort_keys=True))
    if "prompt" in meta:
        info.add_text("prompt", str(meta["prompt"]))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_png_meta(path: str) -> dict:
    return json.loads(Image.open(path).text["elite"])
