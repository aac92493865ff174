"""CLIP text encoder with ELITE's word injection, built from the model's own modules.

Each concept's placeholder token is replaced by its K injected words (K = 1: w0 or one chosen
word; K = 5: all words); they occupy positions start..start+K-1 and every later token shifts right
by K-1, so a concept's words start K-1 positions later for every concept placed before it in the
prompt. The sequence is truncated at its length (77). Position embeddings and the causal
transformer then run as usual. With one concept this is the authors' injection exactly; with
several it is their injection applied at each placeholder, the last one first. Written with
gathers (no Python loop over the batch or the concepts) so that it exports.

A concept whose index is >= the sequence length (77) is absent: nothing is injected for it (what
pads a batch's requests to the same number of concepts).
"""
from __future__ import annotations

import torch
from torch import nn


def injection_source(length: int, index: torch.Tensor, k: int) -> torch.Tensor:
    """Where each output position reads from in cat([token embeddings (L), words (C*K)]).

    index: [B,C] placeholder positions (or [B] for one concept; >= L: absent) -> [B,L] positions into
    the L+C*K table, concept c's words at L+c*K..L+c*K+K-1."""
    idx = index.long().view(index.shape[0], -1).unsqueeze(1)  # [B,1,C]
    pos = torch.arange(length, device=index.device).view(1, length, 1)  # [1,L,1]
    concept = torch.arange(idx.shape[2], device=index.device).view(1, 1, -1)  # [1,1,C]
    before = (idx < idx.transpose(1, 2)).sum(dim=2).unsqueeze(1)  # [B,1,C]: concepts placed before c
    start = idx + (k - 1) * before  # [B,1,C]: c's first word after the earlier concepts' shifts
    in_block = (pos >= start) & (pos < start + k)  # [B,L,C]
    from_word = length + concept * k + (pos - start)  # read only where in_block (no clamp: an int64
    # Clip is not TensorRT's)
    is_word = in_block.sum(dim=2) > 0  # [B,L]
    word = torch.where(in_block, from_word, 0).sum(dim=2)  # [B,L]: at most one block holds a position
    from_token = pos.squeeze(2) - (k - 1) * (start + k <= pos).sum(dim=2)  # back past the blocks before
    return torch.where(is_word, word, from_token)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [1,1,L,L]: 0 on and below the diagonal, dtype's min above (as CLIP)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class InjectedTextEncoder(nn.Module):
    """(token ids [B,L], words [B,C,K,D] | None, index [B,C]) -> last hidden state after final LN [B,L,D].

    One concept may also be given as words [B,K,D] and index [B]."""

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
            if words.dim() == 3:  # one concept: [B,K,D]
                words = words.unsqueeze(1)
            K = words.shape[2]
            flat = words.reshape(B, words.shape[1] * K, D).to(tokens.dtype)  # [B,C*K,D]
            table = torch.cat([tokens, flat], dim=1)  # [B,L+C*K,D]
            src = injection_source(L, index, K)  # [B,L]
            tokens = table.gather(1, src.unsqueeze(-1).expand(B, L, D))
        return tokens + self.embeddings.position_embedding.weight[:L].unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, words: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids, words, index)  # [B,L,D]
        mask = causal_mask(x.shape[1], x.dtype, x.device)
        return self.final_layer_norm(self.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)
