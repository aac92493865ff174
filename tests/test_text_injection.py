"""Word injection into the CLIP text encoder (K = 1 and K = 5) and prompt tokenization."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from elite_export.errors import EliteError
from elite_export.runtime.prompt import PromptTokenizer


@pytest.fixture(scope="module")
def tok(toy_models):
    return PromptTokenizer(toy_models.tokenizer.backend_tokenizer)


def authors_embeddings(text_encoder, ids: torch.Tensor, words: torch.Tensor, index: list[int]) -> torch.Tensor:
    """The authors' inj_forward_text, loop for loop: shift the tail right by K-1, write the words."""
    emb = text_encoder.embeddings.token_embedding(ids)
    new = emb.clone()
    K = words.shape[1]
    for b, idx in enumerate(index):
        n = new[b, idx + K:].shape[0]
        new[b, idx + K:] = emb[b, idx + 1: idx + 1 + n]
        new[b, idx: idx + K] = words[b]
    return new + text_encoder.embeddings.position_embedding.weight[: ids.shape[1]]


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 5])
def test_injection_matches_the_authors_loop(toy_models, tok, k):
    prompts = ["a photo of a S", "a S in the style of Van Gogh on a very long beach at sunset with friends"]
    ids = torch.from_numpy(torch.stack([torch.from_numpy(tok.ids(p)) for p in prompts]).numpy())
    index = [tok.placeholder_index(p) for p in prompts]
    words = torch.randn(2, k, toy_models.text_dim, generator=torch.Generator().manual_seed(k))
    te = toy_models.text_encoder
    got = te.embed(ids, words, torch.tensor(index))
    assert_close(got, authors_embeddings(te, ids, words, index), atol=0, what=f"K={k} embeddings")
    # the words sit at idx..idx+K-1 and the token after the placeholder moved to idx+K
    pos = te.embeddings.position_embedding.weight
    i = index[0]
    assert_close(got[0, i: i + k] - pos[i: i + k], words[0], atol=1e-6, what="words in place")
    assert_close(got[0, i + k] - pos[i + k], te.embeddings.token_embedding(ids[0, i + 1]), atol=1e-6,
                 what="next token shifted")


@torch.no_grad()
def test_identity_injection_equals_transformers_text_model(toy_paths, toy_models, tok):
    """Injecting the placeholder's own embedding (K=1) must give exactly what CLIPTextModel gives."""
    from transformers import CLIPTextModel

    hf = CLIPTextModel.from_pretrained(toy_paths.sd, subfolder="text_encoder").eval()
    prompt = "a S on the beach"
    ids = torch.from_numpy(tok.ids(prompt))[None]
    idx = tok.placeholder_index(prompt)
    own = toy_models.text_encoder.embeddings.token_embedding(ids)[:, idx: idx + 1]
    got = toy_models.text_encoder(ids, own, torch.tensor([idx]))
    assert_close(got, hf(input_ids=ids).last_hidden_state, atol=1e-5, what="identity injection")
    assert_close(toy_models.text_encoder(ids), hf(input_ids=ids).last_hidden_state, atol=1e-5, what="no injection")


def test_tokenizer_matches_clip_tokenizer(toy_models, tok):
    prompts = ["a photo of a S", "A S in the style of Van Gogh!", "", "S" + " very" * 90, "a S's toy, 3 times"]
    for p in prompts:
        want = toy_models.tokenizer(p, padding="max_length", truncation=True, max_length=77).input_ids
        assert tok.ids(p).tolist() == want, p
    assert tok.ids("a photo of a S").tolist()[:7] == [49406, 320, 1125, 539, 320, 338, 49407]


def test_placeholder_index_and_errors(tok):
    assert tok.placeholder_index("a photo of a S") == 5
    assert tok.placeholder_index("a S in the style of Van Gogh") == 2  # the oracle's case
    with pytest.raises(EliteError, match="no placeholder"):
        tok.placeholder_index("a photo of a cat")
    with pytest.raises(EliteError, match="past the 76"):
        tok.placeholder_index("word " * 80 + "S")
    with pytest.raises(EliteError, match="one token"):
        PromptTokenizer(tok.tokenizer, "xyzzyplugh")


@torch.no_grad()
def test_token_ids_never_pass_through_the_float_dtype(toy_pipeline):
    """fp16/bf16 cannot hold token 49406 exactly (it rounds to 49408, past the vocabulary)."""
    dtype = toy_pipeline.dtype
    try:
        toy_pipeline.dtype = torch.bfloat16  # what the pipeline would cast floats to; the models stay fp32
        got = toy_pipeline.encode_text(["a photo of a S"], None)
    finally:
        toy_pipeline.dtype = dtype
    assert_close(got, toy_pipeline.encode_text(["a photo of a S"], None), atol=0, what="ids unaffected by dtype")
