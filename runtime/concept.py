"""Concept files: a concept's words and local tokens, encoded once, reused without the vision encoder.

A .concept file is safetensors (`words` [5,D], `local_tokens` [P,D], float32) with metadata: the
bundle id (the model it was encoded with), the concept id (preprocess.concept_id), the source image's
name and the image's and mask's sha256, and the format. `elite-run encode` writes them to disk; the
HTTP service returns the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.bundle import Bundle, file_sha256
from elite_export.runtime.requests import EncodedConcept

CONCEPT_FORMAT = "elite-concept/1"


def concept_bytes(concept: EncodedConcept, bundle: Bundle, image_name: str, image_sha256: str,
                  mask_sha256: str) -> bytes:
    """The .concept file's bytes."""
    from safetensors.numpy import save

    meta = {"format": CONCEPT_FORMAT, "bundle_id": bundle.id, "concept_id": concept.id, "image": image_name,
            "image_sha256": image_sha256, "mask_sha256": mask_sha256}
    return save({"words": np.ascontiguousarray(concept.words),
                 "local_tokens": np.ascontiguousarray(concept.local_tokens)}, metadata=meta)


def upload_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_concept(path: str, concept: EncodedConcept, bundle: Bundle, image: str, mask: str) -> None:
    data = concept_bytes(concept, bundle, os.path.basename(image), file_sha256(image), file_sha256(mask))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".concept.part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _metadata(data: bytes) -> dict:
    """safetensors' __metadata__: the header is 8 bytes of little-endian length, then JSON."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_concept_bytes(data: bytes, bundle: Bundle, name: str) -> EncodedConcept:
    """A .concept file's bytes -> EncodedConcept, checked against `bundle`. name: for messages."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        meta, tensors = _metadata(data), load(data)
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise EliteError(f"{name} is not a concept file ({' '.join(str(e).split())[:200]})") from None
    if meta.get("format") != CONCEPT_FORMAT or set(tensors) != {"words", "local_tokens"}:
        raise EliteError(f"{name} is not an elite-run concept file")
    if meta.get("bundle_id") != bundle.id:
        raise EliteError(f"concept {name} was encoded with another model (bundle {meta.get('bundle_id')}); "
                         f"this bundle is {bundle.id}: re-encode it with `elite-run encode --bundle {bundle.root}`")
    m = bundle.model
    if tensors["words"].shape != (m.words, m.text_dim) or tensors["local_tokens"].shape != (m.patches, m.text_dim):
        raise EliteError(f"concept {name} has shapes that do not fit this bundle; re-encode it")
    return EncodedConcept(tensors["words"], tensors["local_tokens"], source=meta.get("image", name),
                          id=meta.get("concept_id", ""))


def load_concept_file(path: str, bundle: Bundle) -> EncodedConcept:
    if not os.path.isfile(path):
        raise EliteError(f"concept file {path!r} does not exist; make one with `elite-run encode`")
    with open(path, "rb") as f:
        return load_concept_bytes(f.read(), bundle, repr(path))
