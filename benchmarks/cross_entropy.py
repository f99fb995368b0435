"""The vocabulary cross entropy: kernels/cross_entropy's Triton kernels against megatron-core's.

Logits [s, b, v] in bf16 (jrt-360m: 2048 x 16 tokens, v = 50264; also 8192 x 2), labels [s, b],
one rank (TP=1); forward, and forward + backward to the logits gradient:
  native        megatron's fused_vocab_parallel_cross_entropy (cross_entropy_fusion_impl
                "native", the model's loss before these kernels; the baseline)
  unfused       megatron's tensor_parallel.vocab_parallel_cross_entropy
  triton        the kernels, the gradient in a new tensor
  triton-inpl   the kernels, the gradient written over the logits (what JRTModel runs)
Prints ms, the speed-up over native, peak memory beyond the inputs, and the floor at the HBM
bandwidth: the fewest bytes (the logits read once, the gradient written once) and the kernels'
own passes (the logits read forward and backward, the gradient written once).

    python benchmarks/cross_entropy.py
    python benchmarks/cross_entropy.py --tune          # sweep the kernels' blocks and warps first
    python benchmarks/cross_entropy.py --shapes 2048x16 --json out.json
"""
from __future__ import annotations


import torch
from gpu_timing import (  # siblings: benchmarks/ is on sys.path
    fastest, ms, peak_mib, require_cuda, shapes_parser, token_shapes,
    write_json)

from kernels.cross_entropy import triton_cross_entropy as T

VOCAB = 50264
DT = torch.bfloat16
TUNE = [(block, warps) for block in (2048, 4096, 8192, 16384) for warps in (4, 8, 16, 32)]


def inputs(s, b, v=VOCAB):
    logits = torch.randn(s, b, v, device="cuda", dtype=DT) * 3
    labels = torch.randint(0, v, (s, b), device="cuda")
    return logits, labels, torch.randn(s, b, device="cuda")


def methods(group):
    from megatron.core import tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    return {
        "native": lambda x, y: fused_vocab_parallel_cross_entropy(x, y, group),
        "unfused": tensor_parallel.vocab_parallel_cross_entropy,
        "triton": lambda x, y: T.vocab_parallel_cross_entropy_triton(x, y, group, False),
        "triton-inpl": lambda x, y: T.vocab_parallel_cross_entropy_triton(x, y, group, True),
    }


def fwd_bwd(fn, logits, labels, dloss):
    """One step on a fresh leaf over the same memory (the in-place backward overwrites it:
    the timing does not depend on the values)."""
    def run():
        x = logits.detach().requires_grad_()
        torch.autograd.grad(fn(x, labels), x, dloss)
    return run


def rows_for(s, b, group, bw_tbs):
    logits, labels, dloss = inputs(s, b)
    nbytes = logits.numel() * logits.element_size()
    floor_ms, passes_ms = 2 * nbytes / bw_tbs / 1e9, 3 * nbytes / bw_tbs / 1e9
    rows = []
    for name, fn in methods(group).items():
        try:
            with torch.no_grad():
                t_f = ms(lambda: fn(logits, labels))
            step = fwd_bwd(fn, logits, labels, dloss)
            t_fb = ms(step)
            mem = peak_mib(step)
        except Exception as e:  # e.g. out of memory at a long shape
            print(f"  {name} {s}x{b}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append(dict(method=name, s=s, b=b, v=logits.shape[-1], fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         peak_mib=mem, floor_ms=floor_ms, kernel_passes_floor_ms=passes_ms))
        logits.normal_().mul_(3)  # fresh values after an in-place backward
    return rows


def tune(s=2048, b=16):
    """Forward and backward kernels alone at each (block, warps); keeps the fastest."""
    logits, labels, dloss = inputs(s, b)
    x, y = logits.view(-1, logits.shape[-1]), labels.view(-1)
    lse, _ = T.local_lse_and_label_logit(x, y, 0)
    out = torch.empty_like(x)
    kernels = {"FWD_CONFIG": lambda: T.local_lse_and_label_logit(x, y, 0),
               "BWD_CONFIG": lambda: T.logits_grad(x, y, lse, dloss.view(-1), 0, out)}
    for attr, run in kernels.items():
        fastest(attr, TUNE, lambda cfg: setattr(T, attr, cfg), run)


def main():
    args = shapes_parser("sweep the kernels' blocks and warps first").parse_args()
    require_cuda("benchmarks/cross_entropy.py needs a CUDA GPU (megatron's fused loss and the "
                 "Triton kernels run only there)")
    from megatron.core import parallel_state

    from megatron_jrt.distributed import init_distributed

    init_distributed()  # a lone rank: megatron's losses take the TP group (of one)
    group = parallel_state.get_tensor_model_parallel_group()
    if args.tune:
        tune()
    print(f"kernel configs (columns per block, warps): forward {T.FWD_CONFIG}, "
          f"backward {T.BWD_CONFIG}")
    rows = [row for s, b in token_shapes(args.shapes)
            for row in rows_for(s, b, group, args.bandwidth)]
    for row in rows:
        base = next((r for r in rows if r["method"] == "native" and r["s"] == row["s"]
                     and r["b"] == row["b"]), None)
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"] if base else None
        row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"] if base else None
    print(f"\n{'method':12} {'s x b':>9} {'fwd ms':>8} {'x':>7} {'fwd+bwd ms':>11} {'x':>7} "
          f"{'peak MiB':>9} {'floor ms':>9} {'3-pass ms':>9}")
    for r in rows:
        x_f = f"{r['fwd_speedup']:6.2f}x" if r["fwd_speedup"] else "      -"
        x_fb = f"{r['fwd_bwd_speedup']:6.2f}x" if r["fwd_bwd_speedup"] else "      -"
        print(f"{r['method']:12} {r['s']:>4}x{r['b']:<4} {r['fwd_ms']:8.3f} {x_f} "
              f"{r['fwd_bwd_ms']:11.3f} {x_fb} {r['peak_mib']:9.0f} {r['floor_ms']:9.3f} "
              f"{r['kernel_passes_floor_ms']:9.3f}")
    print(f"floor: the logits read once and the gradient written once at {args.bandwidth} TB/s; "
          "3-pass: the kernels' reads (forward, backward) and write")
    write_json(args.json, fwd_config=T.FWD_CONFIG, bwd_config=T.BWD_CONFIG,
               bandwidth_tbs=args.bandwidth, rows=rows)


if __name__ == "__main__":
    main()
