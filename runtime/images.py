"""Writing images: PNGs whose text metadata holds every setting needed to reproduce them."""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
from PIL import Image, PngImagePlugin


def png_bytes(image: np.ndarray, meta: dict) -> bytes:
    """uint8 [H,W,3] -> PNG bytes with an `elite` JSON text chunk (and `prompt`, for image viewers)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("elite", json.dumps(meta, sort_keys=True))
    if "prompt" in meta:
        info.add_text("prompt", str(meta["prompt"]))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str, image: np.ndarray, meta: dict) -> None:
    """png_bytes() written to a temp file, then renamed: never a half-written PNG at `path`."""
    data = png_bytes(image, meta)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_png_meta(path) -> dict:
    """The `elite` chunk of a PNG (a path or a file object)."""
    return json.loads(Image.open(path).text["elite"])
