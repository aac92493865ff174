"""Prompt -> token ids [77] and the placeholders' positions (the `tokenizers` library only).

Concept c of a request is named in its prompt by the c-th placeholder word (default S, V, W; each
must be one token, checked when the tokenizer is made). A placeholder's index is the position of
its token in the tokenized prompt (start token at 0). The authors count space-separated words + 1,
which agrees whenever every word before the placeholder is one token; if a placeholder occurs
twice the last occurrence wins, as in their loop. Only the first C placeholders are special in a
request with C concepts: with one concept, `V` and `W` are ordinary words.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from elite_export.errors import EliteError

MAX_LENGTH = 77
DEFAULT_PLACEHOLDERS = ("S", "V", "W")  # concept 1, 2, 3: single CLIP tokens ("S1" is two: s, 1)


def word_positions(indices: Sequence[int], k: int) -> list[int]:
    """Where each concept's first word lands once every concept's K words are injected: its
    placeholder's index plus K-1 for each concept placed before it (the UNet's m_c column)."""
    return [i + (k - 1) * sum(j < i for j in indices) for i in indices]


class PromptTokenizer:
    """CLIP tokenization as `CLIPTokenizer(..., padding="max_length", truncation=True, max_length=77)`."""

    def __init__(self, tokenizer: Tokenizer, placeholders: str | Sequence[str] = DEFAULT_PLACEHOLDERS,
                 max_length: int = MAX_LENGTH):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy: we pad and truncate ourselves
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.max_length = tokenizer, max_length
        self.placeholders = (placeholders,) if isinstance(placeholders, str) else tuple(placeholders)
        self.placeholder = self.placeholders[0]  # concept 1's
        self.pad_id = tokenizer.token_to_id("<|endoftext|>")
        self.placeholder_ids = tuple(self._placeholder_id(p) for p in self.placeholders)
        if len(set(self.placeholder_ids)) != len(self.placeholders):
            raise EliteError(f"placeholders {', '.join(self.placeholders)} are not distinct tokens (CLIP "
                             "lowercases); give a different word per concept")
        self.placeholder_id = self.placeholder_ids[0]

    def _placeholder_id(self, word: str) -> int:
        ids = self._content(word)
        if len(ids) != 1:
            raise EliteError(f"placeholder {word!r} is {len(ids)} tokens for this tokenizer; choose a word "
                             f"that is one token (the defaults are {', '.join(DEFAULT_PLACEHOLDERS)}; "
                             "letters followed by digits are two tokens)")
        return ids[0]

    @classmethod
    def from_file(cls, path: str, placeholders: str | Sequence[str] = DEFAULT_PLACEHOLDERS) -> "PromptTokenizer":
        return cls(Tokenizer.from_file(path), placeholders)

    def _content(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids(self, prompt: str) -> np.ndarray:
        """[77] int64: start, at most 75 content tokens, end, then end-token padding."""
        bos, eos = self.tokenizer.token_to_id("<|startoftext|>"), self.pad_id
        content = self._content(prompt)[: self.max_length - 2]
        ids = [bos, *content, eos]
        return np.array(ids + [self.pad_id] * (self.max_length - len(ids)), dtype=np.int64)

    def placeholder_indices(self, prompt: str, n: int = 1) -> list[int]:
        """Index of each of the first n placeholders (concepts 1..n) in the tokenized prompt."""
        if n > len(self.placeholders):
            raise EliteError(f"{n} concepts in one prompt; this model has placeholders for "
                             f"{len(self.placeholders)} ({', '.join(self.placeholders)})")
        content = self._content(prompt)
        out = []
        for c, (word, token) in enumerate(zip(self.placeholders[:n], self.placeholder_ids)):
            hits = [i + 1 for i, t in enumerate(content) if t == token]
            which = f" for concept {c + 1}" if n > 1 else ""
            if not hits:
                raise EliteError(f"prompt {prompt!r} has no placeholder {word!r}{which}; "
                                 f"write it as a separate word, e.g. 'a photo of a {word}'")
            if hits[-1] > self.max_length - 1:
                raise EliteError(f"the placeholder {word!r} in prompt {prompt!r} is token {hits[-1]}, past "
                                 f"the {self.max_length - 1} the text encoder sees; shorten the prompt")
            out.append(hits[-1])
        return out

    def placeholder_index(self, prompt: str) -> int:
        """Index of concept 1's placeholder."""
        return self.placeholder_indices(prompt, 1)[0]

    def word_positions(self, prompt: str, n: int, k: int) -> tuple[list[int], list[int]]:
        """(placeholder indices, word positions) of concepts 1..n with K words each; a concept whose
        words the earlier concepts' words push past the text's end is a user error."""
        indices = self.placeholder_indices(prompt, n)
        starts = word_positions(indices, k)
        for c, s in enumerate(starts):
            if s > self.max_length - 1:
                raise EliteError(f"with {k} words per concept, concept {c + 1}'s words in prompt {prompt!r} "
                                 f"start at token {s}, past the {self.max_length - 1} the text encoder sees; "
                                 "shorten the prompt or inject one word (--words 0..4)")
        return indices, starts

    def encode(self, prompt: str) -> tuple[np.ndarray, int]:
        return self.ids(prompt), self.placeholder_index(prompt)
