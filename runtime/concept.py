"""Concept files: a concept's words and local tokens, encoded once, reused without the vision encoder.

A .concept file is safetensors (`words` [5,D], `local_tokens` [P,D], float32) with metadata: the
bundle id (the model it was encoded with), the source image's and mask's sha256, and the format.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle, file_sha256
from elite_export.runtime.requests import EncodedConcept

CONCEPT_FORMAT = "elite-concept/1"


def save_concept(path: str, concept: EncodedConcept, bundle: Bundle, image: str, mask: str) -> None:
    from safetensors.numpy import save_file

    meta = {"format": CONCEPT_FORMAT, "bundle_id": bundle.id, "image": os.path.basename(image),
            "image_sha256": file_sha256(image), "mask_sha256": file_sha256(mask)}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".concept.part")
    os.close(fd)
    try:
        save_file({"words": np.ascontiguousarray(concept.words), "local_tokens": np.ascontiguousarray(concept.local_tokens)},
                  tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_concept_file(path: str, bundle: Bundle) -> EncodedConcept:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise EliteError(f"concept file {path!r} does not exist; make one with `elite-run encode`")
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise EliteError(f"{path!r} is not a concept file ({e})") from None
    if meta.get("format") != CONCEPT_FORMAT or set(tensors) != {"words", "local_tokens"}:
        raise EliteError(f"{path!r} is not an elite-run concept file")
    if meta.get("bundle_id") != bundle.id:
        raise EliteError(f"concept {path!r} was encoded with another model (bundle {meta.get('bundle_id')}); "
                         f"this bundle is {bundle.id}: re-encode it with `elite-run encode --bundle {bundle.root}`")
    m = bundle.model
    if tensors["words"].shape != (m.words, m.text_dim) or tensors["local_tokens"].shape != (m.patches, m.text_dim):
        raise EliteError(f"concept {path!r} has shapes that do not fit this bundle; re-encode it")
    return EncodedConcept(tensors["words"], tensors["local_tokens"], source=meta.get("image", path))
