"""Accuracy and speed of the ELITE cross-attention Triton kernel on a CUDA GPU.

    python scripts/gpu_attention_bench.py --json out/attention_bench.json [--sweep]
    python scripts/gpu_attention_bench.py --tiny --json /tmp/tiny.json   # CPU smoke run

(a) fp16 max errors of the kernel against the formula in fp32 (reference_cross_attention on the
    same fp16 inputs, upcast) for SD 1.4's cross-attention shapes at 512x512, B=2 ([uncond; cond]),
    H=8, Nk=77, Nl=256: out_g, out_l, m, and ELITE's combined output.
(b) time per call, median: the kernel, "two-SDPA" (the fastest honest torch baseline at hand: two
    F.scaled_dot_product_attention calls for out_g and out_l, plus one q k^T matmul for m as
    exp(score[idx] - logsumexp(scores))), and the naive explicit-softmax formula. Timed eagerly
    (triton.testing.do_bench: includes Python launch overhead) and as a replayed CUDA graph
    (do_bench_cudagraph: GPU time, close to what a TensorRT engine pays).
--sweep also times a grid of kernel block configs per shape (about a minute more).
--tiny: tiny shapes; without a GPU the kernel runs in the Triton interpreter and timings are
    wall-clock on the CPU (only to exercise this script).
Needs torch and triton only (imports engines/attention_kernel.py and engines/attention_op.py).
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SD14_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (Nq, d) of attn2 at 512x512
TINY_SHAPES = [(17, 40), (64, 8)]
N_KEYS, N_LOCAL = 77, 256
IDX = [2, 5]  # placeholder position per sample
LAM = 0.6
SWEEP = list(itertools.product((32, 64, 128), (32, 64), (4, 8), (1, 2)))  # bm, bn, warps, stages
BASELINE_NOTE = ("two_sdpa: F.scaled_dot_product_attention for out_g and out_l, plus m = "
                 "exp(s[idx] - logsumexp(s)) from s = (q k^T).float() * scale; naive: explicit "
                 "fp32 softmax of q k^T * scale for both branches, P.half() @ v, m = P[..., idx]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time kernel block configs")
    parser.add_argument("--concepts", type=int, default=1, help="concepts per sample (local branches)")
    return parser.parse_args(argv)


def import_attention():
    """attention_kernel and attention_op, from the installed package or straight from the repo."""
    try:
        from elite_export.engines import attention_kernel, attention_op
    except ImportError:  # not installed (a bare GPU host): import the engines/ folder directly
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from engines import attention_kernel, attention_op
    return attention_kernel, attention_op


def make_inputs(n_queries, head_dim, batch, heads, device, seed=0, concepts=1):
    """q [B,H,Nq,d]; k, v [B,H,77,d]; k_l, v_l [B,C,H,256,d]; idx [B,C] (concept c of sample b at IDX[b]+3c)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(batch, heads, n_queries, head_dim), (batch, heads, N_KEYS, head_dim), (batch, heads, N_KEYS, head_dim),
              (batch, concepts, heads, N_LOCAL, head_dim), (batch, concepts, heads, N_LOCAL, head_dim)]
    tensors = [torch.randn(*s, generator=gen).half().to(device) for s in shapes]
    idx = torch.tensor([[IDX[b] + 3 * c for c in range(concepts)] for b in range(batch)], dtype=torch.int32,
                       device=device)
    return [*tensors, idx]


def pick_columns(probs_or_scores, idx):
    """[B,H,Nq,Nk] at column idx[b,c] -> [B,C,H,Nq]."""
    B, H, Nq, _ = probs_or_scores.shape
    pick = idx.long()[:, None, None, :].expand(B, H, Nq, idx.shape[1])
    return probs_or_scores.gather(-1, pick).permute(0, 3, 1, 2)


def two_sdpa(q, k, v, k_l, v_l, idx):
    out_g = F.scaled_dot_product_attention(q, k, v)
    q_c = q.unsqueeze(1).expand(-1, k_l.shape[1], -1, -1, -1)  # [B,C,H,Nq,d]
    out_l = F.scaled_dot_product_attention(q_c, k_l, v_l)  # [B,C,H,Nq,d]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B,H,Nq,Nk]
    m = (pick_columns(scores, idx) - scores.logsumexp(dim=-1).unsqueeze(1)).exp()  # [B,C,H,Nq]
    return out_g, out_l, m


def naive(q, k, v, k_l, v_l, idx):
    scale = q.shape[-1] ** -0.5
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1)  # [B,H,Nq,Nk]
    probs_l = torch.softmax((q.unsqueeze(1) @ k_l.transpose(-1, -2)).float() * scale, dim=-1)  # [B,C,H,Nq,Nl]
    return probs.to(q.dtype) @ v, probs_l.to(q.dtype) @ v_l, pick_columns(probs, idx)


def max_err(got, want):
    return (got.float() - want.float()).abs().max().item()


def accuracy(kernel_fn, attention_op, inputs):
    lam = torch.full(inputs[5].shape, LAM, device=inputs[0].device)  # [B,C]
    combine = attention_op.combine_elite_output
    ref = attention_op.reference_cross_attention(*[t.float() for t in inputs[:5]], inputs[5])
    ref_combined = combine(*ref, lam)
    got = kernel_fn(*inputs)
    sdpa_combined = combine(*two_sdpa(*inputs), lam)
    return {
        "err_out_g": max_err(got[0], ref[0]), "err_out_l": max_err(got[1], ref[1]),
        "err_m": max_err(got[2], ref[2]), "max_m": ref[2].max().item(),
        "err_combined": max_err(combine(*got, lam), ref_combined),
        "max_combined": ref_combined.abs().max().item(),
        "err_combined_two_sdpa": max_err(sdpa_combined, ref_combined),
    }


def time_us(fn, cuda_graph: bool, rep_ms: int = 50) -> float:
    """Median microseconds per call."""
    if torch.cuda.is_available():
        import triton.testing

        if cuda_graph:
            return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def timings(fns: dict, inputs) -> dict:
    result: dict[str, float | str | None] = {}
    for name, fn in fns.items():
        for mode in ("eager", "graph"):
            try:
                result[f"{name}_{mode}_us"] = time_us(lambda: fn(*inputs), mode == "graph")
            except Exception as err:  # keep the other numbers when one baseline cannot run
                result[f"{name}_{mode}_us"] = None
                result[f"{name}_{mode}_error"] = repr(err)[:300]
    return result


def sweep(attention_kernel, inputs, configs) -> list[dict]:
    ref = naive(*inputs)
    rows = []
    for block_m, block_n, warps, stages in configs:
        config = attention_kernel.KernelConfig(block_m, block_n, warps, stages)
        fn = lambda: attention_kernel.elite_cross_attention(*inputs, config=config)  # noqa: E731
        row = {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages}
        try:
            row["err_out_l"] = max_err(fn()[1], ref[1])
            row["graph_us"] = time_us(fn, cuda_graph=True, rep_ms=20)
        except Exception as err:  # e.g. out of shared memory for this config
            row["error"] = repr(err)[:300]
        rows.append(row)
    return rows


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def print_tables(results: list[dict]) -> None:
    print("\n(a) fp16 max abs error vs the fp32 formula (combined: ELITE output, lambda = "
          f"{LAM})\n")
    print("| Nq | d | out_g | out_l | m | max m | combined | max combined | combined, two-SDPA |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['n_queries']} | {r['head_dim']} | {fmt(r.get('err_out_g'), '.2e')} | "
              f"{fmt(r.get('err_out_l'), '.2e')} | {fmt(r.get('err_m'), '.2e')} | "
              f"{fmt(r.get('max_m'), '.3f')} | {fmt(r.get('err_combined'), '.2e')} | "
              f"{fmt(r.get('max_combined'), '.2f')} | "
              f"{fmt(r.get('err_combined_two_sdpa'), '.2e')} |")
    print("\n(b) median time per call, us (eager / CUDA graph)\n")
    print("| Nq | d | kernel | two-SDPA | naive | speedup vs two-SDPA (graph) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [f"{fmt(r.get(f'{n}_eager_us'))} / {fmt(r.get(f'{n}_graph_us'))}"
                 for n in ("kernel", "two_sdpa", "naive")]
        ours, theirs = r.get("kernel_graph_us"), r.get("two_sdpa_graph_us")
        speedup = theirs / ours if ours and theirs else None
        print(f"| {r['n_queries']} | {r['head_dim']} | {' | '.join(cells)} | "
              f"{fmt(speedup, '.2f')}x |")
    print(f"\nbaselines: {BASELINE_NOTE}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.tiny:
        print("no CUDA GPU: use --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before attention_kernel applies @triton.jit
    attention_kernel, attention_op = import_attention()
    import triton

    device = "cuda" if on_gpu else "cpu"
    batch, heads = 2, (2 if args.tiny else 8)
    shapes = TINY_SHAPES if args.tiny else SD14_SHAPES
    configs = SWEEP[:2] if args.tiny else SWEEP
    report = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "tiny": args.tiny,
        "batch": batch, "heads": heads, "n_keys": N_KEYS, "n_local": N_LOCAL, "idx": IDX,
        "concepts": args.concepts,
        "baselines": BASELINE_NOTE, "results": [],
    }
    started = time.time()
    try:
        for n_queries, head_dim in shapes:
            inputs = make_inputs(n_queries, head_dim, batch, heads, device, concepts=args.concepts)
            row: dict = {"n_queries": n_queries, "head_dim": head_dim,
                         "config": vars(attention_kernel.default_config(head_dim))}
            try:
                row.update(accuracy(attention_kernel.elite_cross_attention, attention_op, inputs))
            except Exception as err:
                row["accuracy_error"] = repr(err)[:300]
            fns = {"kernel": attention_kernel.elite_cross_attention, "two_sdpa": two_sdpa,
                   "naive": naive}
            row.update(timings(fns, inputs))
            if args.sweep:
                row["sweep"] = sweep(attention_kernel, inputs, configs)
                timed = [r for r in row["sweep"] if "graph_us" in r]
                row["sweep_best"] = min(timed, key=lambda r: r["graph_us"]) if timed else None
            report["results"].append(row)
            print(f"done Nq={n_queries} d={head_dim} at {time.time() - started:.1f} s", flush=True)
    finally:
        report["seconds"] = time.time() - started
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print_tables(report["results"])
    if args.sweep:
        print("\nbest sweep config per shape (graph us):")
        for r in report["results"]:
            print(f"  Nq={r['n_queries']} d={r['head_dim']}: {r.get('sweep_best')}")
    print(f"\n{report['seconds']:.1f} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
