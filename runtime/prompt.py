"""Prompt -> token ids [77] and the placeholder's position (the `tokenizers` library only).

The placeholder index is the position of the placeholder's token in the tokenized prompt (start
token at 0). The authors count space-separated words + 1, which agrees whenever every word before
the placeholder is one token; if the placeholder occurs twice the last occurrence wins, as in
their loop.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from elite_export.errors import EliteError

MAX_LENGTH = 77


class PromptTokenizer:
    """CLIP tokenization as `CLIPTokenizer(..., padding="max_length", truncation=True, max_length=77)`."""

    def __init__(self, tokenizer: Tokenizer, placeholder: str = "S", max_length: int = MAX_LENGTH):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a private copy: we pad and truncate ourselves
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.placeholder, self.max_length = tokenizer, placeholder, max_length
        self.pad_id = tokenizer.token_to_id("<|endoftext|>")
        ids = self._content(placeholder)
        if len(ids) != 1:
            raise EliteError(f"placeholder {placeholder!r} is {len(ids)} tokens for this tokenizer; "
                             "choose a word that is one token (the default is 'S')")
        self.placeholder_id = ids[0]

    @classmethod
    def from_file(cls, path: str, placeholder: str = "S") -> "PromptTokenizer":
        return cls(Tokenizer.from_file(path), placeholder)

    def _content(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids(self, prompt: str) -> np.ndarray:
        """[77] int64: start, at most 75 content tokens, end, then end-token padding."""
        bos, eos = self.tokenizer.token_to_id("<|startoftext|>"), self.pad_id
        content = self._content(prompt)[: self.max_length - 2]
        ids = [bos, *content, eos]
        return np.array(ids + [self.pad_id] * (self.max_length - len(ids)), dtype=np.int64)

    def placeholder_index(self, prompt: str) -> int:
        content = self._content(prompt)
        hits = [i + 1 for i, t in enumerate(content) if t == self.placeholder_id]
        if not hits:
            raise EliteError(f"prompt {prompt!r} has no placeholder {self.placeholder!r}; "
                             f"write it as a separate word, e.g. 'a photo of a {self.placeholder}'")
        if hits[-1] > self.max_length - 1:
            raise EliteError(f"the placeholder in prompt {prompt!r} is token {hits[-1]}, past the "
                             f"{self.max_length - 1} the text encoder sees; shorten the prompt")
        return hits[-1]

    def encode(self, prompt: str) -> tuple[np.ndarray, int]:
        return self.ids(prompt), self.placeholder_index(prompt)
