"""The benchmark's ways on the toy model: the authors' loop computes what the reference computes, and
every way, measurement and report runs end to end (the SD-size run is `elite-export bench`)."""
from __future__ import annotations

import numpy as np
import torch
from conftest import assert_close

from elite_export.runtime.requests import GenerationSettings, Request


def test_authors_two_unbatched_calls_equal_the_batched_call(toy_models, concept):
    from elite_export.authors_way import AuthorsPipeline, formula_self_attention
    from elite_export.pipeline import ElitePipeline

    reference, authors = ElitePipeline(toy_models), AuthorsPipeline(toy_models)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=gen)
    text2, local = torch.randn(2, 77, toy_models.text_dim, generator=gen), torch.randn(1, 256, toy_models.text_dim)
    index, lam = torch.tensor([3]), torch.tensor([0.8])  # the conditional row's local branch
    t = torch.tensor(500.0)
    want = reference.predict_noise(x, t, text2, local, index, lam)
    with formula_self_attention(toy_models.unet):
        got = authors.predict_noise(x, t, text2, local, index, lam)
    for g, w, what in zip(got, want, ("uncond", "cond")):
        assert_close(g, w, atol=1e-5, what=f"authors' {what} call vs the batched one")
    attn1 = [p for name, p in toy_models.unet.attn_processors.items() if ".attn1." in name]
    assert {type(p).__name__ for p in attn1} == {"SelfAttnProcessor"}  # the reference's restored after


def test_authors_generation_matches_the_reference(toy_models, concept):
    from elite_export.authors_way import AuthorsPipeline, formula_self_attention
    from elite_export.pipeline import ElitePipeline

    settings = GenerationSettings(steps=3, height=256, width=256)
    requests = [Request(concept, "a photo of a S", 7)]
    want = ElitePipeline(toy_models)(requests, settings)
    with formula_self_attention(toy_models.unet):
        got = AuthorsPipeline(toy_models)(requests, settings)
    assert got.ok and want.ok
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def test_every_way_measures_and_reports(toy_models, toy_bundle, concept):
    from elite_export.bench.run import BenchOptions, measure_way, runtime_overhead
    from elite_export.bench.measure import machine
    from elite_export.bench.report import markdown, text_report
    from elite_export.bench.ways import STAGES, RuntimeWay, TorchWay
    from elite_export.runtime.bundle import Bundle
    from elite_export.runtime.pipeline import open_runners

    opts = BenchOptions(size=256, steps=2, warmup=0, reps=1)
    ways = {}
    for authors in (True, False):
        with TorchWay(toy_models, opts.workload, concept, "cpu", torch.float32, authors) as way:
            ways[way.name] = measure_way(way, opts, 0.0)
    bundle = Bundle.open(str(toy_bundle))
    with RuntimeWay(bundle, open_runners(bundle), opts.workload, concept, "onnxruntime") as way:
        ways[way.name] = measure_way(way, opts, 0.0)
        overhead = runtime_overhead(way, opts, 1)
    assert set(ways) == {"authors", "reference", "runtime-onnxruntime"}
    assert all(set(w["stages"]) == set(STAGES) and w["peak_rss_gib"] > 0 for w in ways.values())
    assert overhead["steps"] == 2 and overhead["graph_ms"] > 0 and overhead["loop_ms"] >= 0
    result = {"date": "today", "machine": machine(1, False), "load_average_end": [0.0] * 3, "ways": ways,
              "options": {"device": "cpu", "size": 256, "batch": 1, "steps": 2, "dtype": "fp32", "warmup": 0,
                          "reps": 1},
              "unavailable": {"runtime-tensorrt": "no TensorRT"}, "overhead": {"toy": overhead}}
    text, md = text_report(result), markdown(result)
    for stage in STAGES:
        assert stage in text and f"| {stage} |" in md
    assert "c-ort vs a" in text and "runtime-tensorrt: n/a (no TensorRT)" in text


def test_ort_sweep_times_each_variant_and_profiles_by_op(toy_bundle, tmp_path):
    import shutil

    from elite_export.bench.ort import Variant, sweep

    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle, bundle)
    variants = [Variant("unfused", "all", 1), Variant("fused", "basic", 1, spinning=False)]
    result = sweep(str(bundle), variants, Variant("fused", "all", 1), warmup=0, reps=1, log=lambda line: None)
    assert [r["label"] for r in result["variants"]] == [v.label for v in variants]
    assert result["fused_vs_unfused_max_abs"] < 1e-5
    assert result["profile_ms_by_op"]["Conv"] > 0 and "conv" in result["profile_ms_by_group"]
    assert not list((bundle / "onnx" / "fp32").glob("bench-ort-*"))  # its scratch folder is gone
