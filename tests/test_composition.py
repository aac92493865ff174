"""Several concepts in one prompt (issue 13), in the PyTorch reference: the attention processor, the
word injection, the placeholders, and how a batch is laid onto the concept axis.

Independent expectations: the pre-issue-13 single-concept code kept verbatim (legacy_single_concept),
the authors' injection loop applied once per placeholder, and the formula written out per sample
and concept."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close
from elite_export.errors import EliteError
from elite_export.runtime.prompt import DEFAULT_PLACEHOLDERS, PromptTokenizer, word_positions
from legacy_single_concept import LegacyCrossAttnProcessor, legacy_injection_source
from test_attention import DH, H, NL, NQ, NT, inputs, make_attn
from test_text_injection import authors_embeddings


def concept_inputs(batch: int, concepts: int, seed: int = 3):
    """x, text as test_attention.inputs; local [B,C,NL,D], index [B,C] (distinct per row), lam [B,C]."""
    x, text, _, _, _ = inputs(batch, seed)
    g = torch.Generator().manual_seed(seed + 1)
    local = torch.randn(batch, concepts, NL, text.shape[-1], generator=g)
    index = torch.stack([torch.randperm(12, generator=g)[:concepts] + 1 for _ in range(batch)])
    lam = torch.rand(batch, concepts, generator=g) + 0.2
    return x, text, local, index, lam


def elite_by_hand(attn, proc, x, text, local, index, lam):
    """out = P v + sum_c lam_c (m_c / max m_c) (P_l,c v_l,c), one sample and concept at a time."""
    outs = []
    for b in range(x.shape[0]):
        q = attn.to_q(x[b]).view(NQ, H, DH).permute(1, 0, 2)  # [H,NQ,DH]
        k = attn.to_k(text[b]).view(NT, H, DH).permute(1, 0, 2)
        v = attn.to_v(text[b]).view(NT, H, DH).permute(1, 0, 2)
        p = torch.softmax(torch.einsum("hqd,hkd->hqk", q, k) / DH ** 0.5, dim=-1)
        out = p @ v
        for c in range(local.shape[1]):
            kl = proc.to_k_local(local[b, c]).view(NL, H, DH).permute(1, 0, 2)
            vl = proc.to_v_local(local[b, c]).view(NL, H, DH).permute(1, 0, 2)
            pl = torch.softmax(torch.einsum("hqd,hkd->hqk", q, kl) / DH ** 0.5, dim=-1)
            m = p[:, :, int(index[b, c])]  # [H,NQ]
            out = out + float(lam[b, c]) * (m / m.max()).unsqueeze(-1) * (pl @ vl)
        outs.append(attn.to_out[0](out.permute(1, 0, 2).reshape(NQ, H * DH)))
    return torch.stack(outs)


def call(proc, attn, x, text, local, index, lam):
    return proc(attn, x, text, elite_local=local, elite_index=index, elite_lambda=lam)


# --- the processor ---------------------------------------------------------------------------------
@torch.no_grad()
def test_one_concept_is_the_single_concept_processor_bit_for_bit():
    attn, proc = make_attn()
    legacy = LegacyCrossAttnProcessor(proc.to_k_local, proc.to_v_local)
    x, text, local, index, lam = inputs(3)
    want = call(legacy, attn, x, text, local, index, lam)
    assert torch.equal(call(proc, attn, x, text, local, index, lam), want)  # the one-concept form
    got = call(proc, attn, x, text, local[:, None], index[:, None], lam[:, None])  # the concept axis, C = 1
    assert torch.equal(got, want)


@torch.no_grad()
@pytest.mark.parametrize("concepts", [2, 3])
def test_several_concepts_match_the_formula(concepts):
    attn, proc = make_attn()
    args = concept_inputs(2, concepts)
    assert_close(call(proc, attn, x := args[0], *args[1:]), elite_by_hand(attn, proc, x, *args[1:]), atol=3e-5,
                 what=f"C={concepts}")


@torch.no_grad()
def test_permuting_concepts_with_their_placeholders_changes_nothing():
    attn, proc = make_attn()
    x, text, local, index, lam = concept_inputs(2, 3)
    perm = torch.tensor([2, 0, 1])
    got = call(proc, attn, x, text, local[:, perm], index[:, perm], lam[:, perm])
    assert_close(got, call(proc, attn, x, text, local, index, lam), atol=1e-6, what="permuted concepts")


@torch.no_grad()
def test_a_concept_with_lambda_zero_adds_exactly_nothing():
    """Whatever its tokens and index (here: the start token's column): the padding of absent concepts."""
    attn, proc = make_attn()
    x, text, local, index, lam = concept_inputs(2, 2)
    pad_local = torch.cat([local, torch.randn_like(local[:, :1])], dim=1)
    pad_index = torch.cat([index, torch.zeros_like(index[:, :1])], dim=1)
    pad_lam = torch.cat([lam, torch.zeros_like(lam[:, :1])], dim=1)
    assert torch.equal(call(proc, attn, x, text, pad_local, pad_index, pad_lam),
                       call(proc, attn, x, text, local, index, lam))


@torch.no_grad()
def test_rows_with_different_concepts_are_independent():
    attn, proc = make_attn()
    x, text, local, index, lam = concept_inputs(3, 2)
    lam[1, 1] = 0.0  # row 1 effectively has one concept
    both = call(proc, attn, x, text, local, index, lam)
    for b in range(3):
        alone = call(proc, attn, x[b:b + 1], text[b:b + 1], local[b:b + 1], index[b:b + 1], lam[b:b + 1])
        assert_close(both[b:b + 1], alone, atol=1e-6, what=f"row {b}")
    row1 = call(proc, attn, x[1:2], text[1:2], local[1:2, :1], index[1:2, :1], lam[1:2, :1])
    assert_close(both[1:2], row1, atol=1e-6, what="row 1 as one concept")


# --- injection -------------------------------------------------------------------------------------
def authors_injection_per_placeholder(te, ids, words, index):
    """The authors' loop applied at each present placeholder, the rightmost first (injecting there moves
    nothing to its left; each later injection shifts the earlier-injected words right by K-1)."""
    emb = []
    pos = te.embeddings.position_embedding.weight[: ids.shape[1]]
    for b in range(ids.shape[0]):
        x = te.embeddings.token_embedding(ids[b:b + 1])  # [1,L,D]
        for c in sorted(range(index.shape[1]), key=lambda c: -int(index[b, c])):
            if int(index[b, c]) < ids.shape[1]:  # present
                x = authors_embeddings_raw(x, words[b:b + 1, c], int(index[b, c]))
        emb.append(x[0] + pos)
    return torch.stack(emb)


def authors_embeddings_raw(emb, words, idx):
    """test_text_injection.authors_embeddings without the position embeddings, on embeddings [1,L,D]."""
    new = emb.clone()
    K = words.shape[1]
    n = new[0, idx + K:].shape[0]
    new[0, idx + K:] = emb[0, idx + 1: idx + 1 + n]
    new[0, idx: idx + K] = words[0]
    return new


@pytest.fixture(scope="module")
def tok(toy_models):
    return PromptTokenizer(toy_models.tokenizer.backend_tokenizer)


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 5])
def test_injection_at_each_placeholder_matches_the_authors_loop(toy_models, tok, k):
    prompts = ["a S and a V on the beach", "a V next to a W and a S, in the style of Van Gogh",
               "a S " + "very " * 66 + "V W"]  # the last: later words pushed past 77 and cut
    ids = torch.from_numpy(np.stack([tok.ids(p) for p in prompts]))
    index = torch.tensor([tok.placeholder_indices(p, 3) if "W" in p else tok.placeholder_indices(p, 2) + [77]
                          for p in prompts])  # the first prompt's third concept is absent
    words = torch.randn(3, 3, k, toy_models.text_dim, generator=torch.Generator().manual_seed(k))
    te = toy_models.text_encoder
    got = te.embed(ids, words, index)
    assert_close(got, authors_injection_per_placeholder(te, ids, words, index), atol=0, what=f"K={k}")
    pos = te.embeddings.position_embedding.weight
    for c, start in enumerate(word_positions(index[1].tolist(), k)):  # each concept's words where they land
        assert_close(got[1, start: start + k] - pos[start: start + k], words[1, c], atol=1e-6, what=f"concept {c}")


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 5])
def test_one_concept_injects_as_before_and_an_absent_concept_injects_nothing(toy_models, tok, k):
    prompts = ["a photo of a S", "a S in the style of Van Gogh on a very long beach at sunset with friends"]
    ids = torch.from_numpy(np.stack([tok.ids(p) for p in prompts]))
    index = torch.tensor([tok.placeholder_index(p) for p in prompts])
    words = torch.randn(2, k, toy_models.text_dim, generator=torch.Generator().manual_seed(k))
    assert torch.equal(legacy_injection_source(77, index, k),
                       __import__("elite_export.text_injection", fromlist=["x"]).injection_source(77, index[:, None], k))
    te = toy_models.text_encoder
    want = te(ids, words, index)  # the one-concept form
    padded_words = torch.cat([words[:, None], torch.randn_like(words[:, None])], dim=1)  # [2,2,K,D]
    padded_index = torch.stack([index, torch.full_like(index, 77)], dim=1)  # concept 2 absent
    assert torch.equal(te(ids, padded_words, padded_index), want)
    assert_close(te.embed(ids, words, index), authors_embeddings(te, ids, words, index.tolist()), atol=0, what="K")


# --- placeholders and layout -------------------------------------------------------------------------
def test_placeholders_are_single_tokens_and_found_per_concept(tok):
    assert tok.placeholders == DEFAULT_PLACEHOLDERS == ("S", "V", "W")
    assert tok.placeholder_indices("a S and a V on the beach", 2) == [2, 5]
    assert tok.placeholder_indices("a V and a S", 2) == [5, 2]
    assert tok.placeholder_index("a S with a W logo") == 2  # one concept: W is an ordinary word
    with pytest.raises(EliteError, match="no placeholder 'V' for concept 2"):
        tok.placeholder_indices("a S on the beach", 2)
    with pytest.raises(EliteError, match="4 concepts in one prompt"):
        tok.placeholder_indices("a S V W", 4)
    with pytest.raises(EliteError, match="2 tokens"):
        PromptTokenizer(tok.tokenizer, ("S1", "S2"))  # CLIP splits letters from digits
    with pytest.raises(EliteError, match="not distinct"):
        PromptTokenizer(tok.tokenizer, ("S", "s"))  # CLIP lowercases


def test_word_positions_shift_by_k_minus_1_per_earlier_concept(tok):
    assert word_positions([2, 5], 1) == [2, 5]
    assert word_positions([2, 5], 5) == [2, 9]
    assert word_positions([9, 2, 5], 5) == [17, 2, 9]
    prompt = "a S " + "x " * 70 + "V"  # V at 73: with K = 5 its words would start at 77, past the text
    assert tok.word_positions(prompt, 2, 1) == ([2, 73], [2, 73])
    assert tok.word_positions(prompt.replace("x x ", "x ", 1), 2, 5) == ([2, 72], [2, 76])  # the last position
    with pytest.raises(EliteError, match="start at token 77"):
        tok.word_positions(prompt, 2, 5)


def test_layout_pads_requests_to_the_batch_s_concept_count(tok, concept):
    from elite_export.runtime.composition import layout
    from elite_export.runtime.requests import Request

    requests = [Request(concept, "a S", 1), Request([concept, concept], "a V and a S", 2, lams=[0.5, 0.7]),
                Request([concept, concept], "a S and a V", 3, mode="global")]
    lay = layout(requests, tok)
    assert lay.num_concepts == 2 and len(lay.concepts) == 5
    np.testing.assert_array_equal(lay.rows, [[0, -1], [1, 2], [3, 4]])
    np.testing.assert_array_equal(lay.text_index, [[2, 77], [5, 2], [2, 5]])
    np.testing.assert_array_equal(lay.word_index, [[2, 0], [5, 2], [2, 9]])  # row 2 global: K = 5 shifts V
    np.testing.assert_array_equal(lay.lam, np.array([[0.8, 0], [0.5, 0.7], [0, 0]], np.float32))
    taken = lay.take(np.arange(5, dtype=np.float32)[:, None] + 1)
    np.testing.assert_array_equal(taken[..., 0], [[1, 0], [2, 3], [4, 5]])
    assert layout(requests[:1], tok, min_concepts=3).num_concepts == 3
    with pytest.raises(EliteError, match="at most 1 per prompt"):
        layout(requests, tok, max_concepts=1)
    with pytest.raises(EliteError, match="2 lambdas for 1 concepts"):
        Request(concept, "a S", 0, lams=[0.1, 0.2])


@torch.no_grad()
def test_local_inputs_for_the_last_rows_leave_the_rows_before_plain():
    """What the UNet graph does with [uncond; cond]: the local branch only on the conditional half."""
    attn, proc = make_attn()
    x, text, local, index, lam = concept_inputs(4, 2)
    zero_first = lam.clone()
    zero_first[:2] = 0.0
    full = call(proc, attn, x, text, local, index, zero_first)
    assert torch.equal(call(proc, attn, x, text, local[2:], index[2:], lam[2:]), full)
    plain = call(proc, attn, x[:2], text[:2], None, None, None)
    assert torch.equal(full[:2], plain)
