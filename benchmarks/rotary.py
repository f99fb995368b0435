"""Rotary embedding on megatron's packed qkv: kernels/rotary's Triton kernel against megatron's
split and rotary (what SelfAttention ran before it).

mixed [s, b, heads * 3 * 64] in bf16 (jrt-360m's sliding-window and the Transformer's layers:
16 heads of 64, one query per group; 2048 x 16 and 8192 x 2 tokens), to rotated q, k and v, and
back to the gradient of mixed:
  megatron  torch.split views, then megatron's apply_rotary_pos_emb on q and on k (cos, sin, two
            products, a negation, two cats and a sum each way), and the split's backward (a cat)
  triton    kernels/rotary.split_rotary_qkv (one kernel each way)
Prints ms and the speed-up over megatron, of the GPU's work (replayed from a CUDA graph) and of
eager calls, and the floor at the HBM bandwidth (qkv read and written once each way).

    python benchmarks/rotary.py
    python benchmarks/rotary.py --tune          # sweep the kernel's rows per program and warps
    python benchmarks/rotary.py --shapes 2048x16 --json out.json
"""
from __future__ import annotations

import torch
from gpu_timing import (  # siblings: benchmarks/ is on sys.path
    fastest, graphed, ms, print_speedups, require_cuda, shapes_parser, token_shapes,
    write_json)

from kernels.rotary import rotate, split_heads
from kernels.rotary import triton_rotary as T

HEADS, HEAD_DIM = 16, 64
DT = torch.bfloat16
CONFIGS = [(rows, warps) for rows in (16, 32, 64, 128, 256) for warps in (1, 2, 4, 8)]


def inputs(s, b):
    mixed = torch.randn(s, b, HEADS * 3 * HEAD_DIM, device="cuda", dtype=DT)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    f = torch.outer(torch.arange(s, device="cuda", dtype=torch.float32), inv_freq)
    return mixed, torch.cat([f, f], dim=-1)[:, None, None, :]


def megatron(mixed, freqs):
    q, k, v = split_heads(mixed, HEADS, HEAD_DIM)
    return rotate(q, freqs), rotate(k, freqs), v  # megatron's math (tests/test_rotary_kernel.py)


METHODS = {"megatron": megatron,
           "triton": lambda mixed, freqs: T.split_rotary_qkv_triton(mixed, freqs, HEADS, HEAD_DIM)}


def fwd_bwd(fn, mixed, freqs):
    grads = [torch.randn_like(t) for t in megatron(mixed, freqs)]
    leaf = mixed.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(leaf, freqs), leaf, grads)


def rows_for(s, b, bw_tbs):
    mixed, freqs = inputs(s, b)
    nbytes = mixed.numel() * mixed.element_size()
    rows = []
    for name, fn in METHODS.items():
        with torch.no_grad():
            t_f, t_f_eager = ms(graphed(lambda: fn(mixed, freqs))), ms(lambda: fn(mixed, freqs))
        step = fwd_bwd(fn, mixed, freqs)
        rows.append(dict(method=name, s=s, b=b, fwd_ms=t_f, fwd_bwd_ms=ms(graphed(step)),
                         eager_fwd_ms=t_f_eager, eager_fwd_bwd_ms=ms(step),
                         fwd_floor_ms=2 * nbytes / bw_tbs / 1e9,
                         fwd_bwd_floor_ms=4 * nbytes / bw_tbs / 1e9))
    return rows


def tune(s=2048, b=16):
    mixed, freqs = inputs(s, b)
    step = fwd_bwd(METHODS["triton"], mixed, freqs)
    fastest("forward + backward", CONFIGS, lambda config: setattr(T, "CONFIG", config), step,
            lambda run: ms(graphed(run)))


def main():
    args = shapes_parser("sweep the kernel's rows per program and warps first").parse_args()
    require_cuda("benchmarks/rotary.py needs a CUDA GPU (the Triton kernel runs only there)")
    if args.tune:
        tune()
    print(f"kernel config (rows per program, warps): {T.CONFIG}")
    rows = [row for s, b in token_shapes(args.shapes) for row in rows_for(s, b, args.bandwidth)]
    print_speedups(rows, "megatron", lambda r: f"{r['s']}x{r['b']}")
    print(f"floors at {args.bandwidth} TB/s: qkv read and q, k, v written forward; the same "
          "again backward")
    write_json(args.json, config=T.CONFIG, heads=HEADS, head_dim=HEAD_DIM,
               bandwidth_tbs=args.bandwidth, rows=rows)


if __name__ == "__main__":
    main()
