"""CLIP text encoder with ELITE's word injection, built from the model's own modules.

The placeholder token's embedding is replaced by K injected words (K = 1: w0 or one chosen word;
K = 5: all words); they occupy positions idx..idx+K-1, later tokens shift right by K-1 and the
sequence is truncated at its length (77). Position embeddings and the causal transformer then
run as usual. Written with gathers (no Python loop over the batch) so that it exports.
"""
from __future__ import annotations

import torch
from torch import nn


def injection_source(length: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """Where each output position reads from in cat([token embeddings (L), words (K)]).

    index: [B] placeholder position -> [B,L] positions into the L+K table.
    """
    pos = torch.arange(length, device=index.device).unsqueeze(0)  # [1,L]
    idx = index.long().unsqueeze(1)  # [B,1]
    from_token = torch.where(pos < idx, pos, pos - k + 1)  # before: same place; after: shifted by K-1
    is_word = (pos >= idx) & (pos < idx + k)
    from_word = length + (pos - idx)  # read only where is_word (no clamp: an int64 Clip is not TensorRT's)
    return torch.where(is_word, from_word, from_token)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [1,1,L,L]: 0 on and below the diagonal, dtype's min above (as CLIP)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class InjectedTextEncoder(nn.Module):
    """(token ids [B,L], words [B,K,D] | None, index [B]) -> last hidden state after final LN [B,L,D]."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        text_model = getattr(text_model, "text_model", text_model)  # transformers 4.x nests it; 5.x does not
        self.embeddings = text_model.embeddings
        self.encoder = text_model.encoder
        self.final_layer_norm = text_model.final_layer_norm

    def embed(self, input_ids: torch.Tensor, words: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the words injected, plus position embeddings -> [B,L,D]."""
        tokens = self.embeddings.token_embedding(input_ids)  # [B,L,D]
        B, L, D = tokens.shape
        if words is not None:
            table = torch.cat([tokens, words.to(tokens.dtype)], dim=1)  # [B,L+K,D]
            src = injection_source(L, index, words.shape[1])  # [B,L]
            tokens = table.gather(1, src.unsqueeze(-1).expand(B, L, D))
        return tokens + self.embeddings.position_embedding.weight[:L].unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, words: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids, words, index)  # [B,L,D]
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        return self.final_layer_norm(self.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)
