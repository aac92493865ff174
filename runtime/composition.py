"""A batch's requests laid onto the graphs' concept axis (torch-free; both pipelines use it).

Request i has C_i concepts; the batch runs with C = max(C_i) (at least `min_concepts`, what a bundle
with a fixed concept count needs). Slot c of row i is concept c of request i, or, for c >= C_i, an
absent slot: zero words and local tokens, a text-encoder index past the text (nothing injected),
UNet word position 0 and lambda 0 (its local branch adds exactly 0). A row therefore gets what it
would get alone, whatever the other rows carry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elite_export.errors import EliteError
from elite_export.runtime.prompt import PromptTokenizer
from elite_export.runtime.requests import Concept, Request


@dataclass
class ConceptLayout:
    concepts: list[Concept]  # every request's concepts, request by request
    rows: np.ndarray  # [n,C] int64: slot -> index into `concepts`; -1 where absent
    text_index: np.ndarray  # [n,C] int64: placeholder index for the text encoder; the text length where absent
    word_index: np.ndarray  # [n,C] int64: position of the concept's first word for the UNet; 0 where absent
    lam: np.ndarray  # [n,C] float32: conditional-row lambda; 0 where absent and in global mode

    @property
    def num_concepts(self) -> int:  # C
        return self.rows.shape[1]

    def rows_ok(self, concept_ok: np.ndarray) -> np.ndarray:
        """bool [len(concepts)] -> bool [n]: a request is sound when every concept it carries is."""
        return np.where(self.rows >= 0, concept_ok[np.maximum(self.rows, 0)], True).all(axis=1)

    def take(self, per_concept: np.ndarray) -> np.ndarray:
        """[len(concepts), ...] -> [n,C,...], zeros in absent slots."""
        out = per_concept[np.maximum(self.rows, 0)]
        out[self.rows < 0] = 0
        return out


def layout(requests: list[Request], tokenizer: PromptTokenizer, min_concepts: int = 1,
           max_concepts: int | None = None) -> ConceptLayout:
    """Tokenize each prompt for its concepts (user errors here, before any graph runs) and pad."""
    most = max(len(r.concepts) for r in requests)
    if max_concepts is not None and most > max_concepts:
        raise EliteError(f"a request has {most} concepts; this model takes at most {max_concepts} per prompt "
                         "(rebuild the bundle with a larger --concepts MAX)")
    n, C = len(requests), max(most, min_concepts)
    rows = np.full((n, C), -1, np.int64)
    text_index = np.full((n, C), tokenizer.max_length, np.int64)
    word_index = np.zeros((n, C), np.int64)
    lam = np.zeros((n, C), np.float32)
    concepts: list[Concept] = []
    for i, r in enumerate(requests):
        c = len(r.concepts)
        indices, starts = tokenizer.word_positions(r.prompt, c, r.num_words)
        rows[i, :c] = np.arange(len(concepts), len(concepts) + c)
        text_index[i, :c], word_index[i, :c], lam[i, :c] = indices, starts, r.local_weights
        concepts += r.concepts
    return ConceptLayout(concepts, rows, text_index, word_index, lam)
