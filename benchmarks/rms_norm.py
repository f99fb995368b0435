"""RMSNorm: kernels/rms_norm's Triton kernels against torch.nn.RMSNorm.

x [s, b, d] in bf16 with a bf16 weight, as the layers run it under bf16 training (jrt-360m:
2048 x 16 tokens of hidden 1024, 53 norms a step; also 8192 x 2); forward, and forward +
backward to the gradients of x and the weight:
  torch    torch.nn.RMSNorm (the layers' norm before these kernels; the baseline)
  triton   the kernels (megatron_jrt.norm.RMSNorm on CUDA)
Prints ms and the speed-up over torch, of the GPU's work (the calls replayed from a CUDA graph,
as in a training step where the GPU runs ahead of Python) and of eager calls (bound by Python
and kernel launches at these sizes: a Triton launch from an autograd.Function costs more CPU
time than torch's C++ ops), and the floor at the HBM bandwidth: x read and y written forward,
x and dy read and dx written backward.

    python benchmarks/rms_norm.py
    python benchmarks/rms_norm.py --tune          # sweep the kernels' tiles and warps first
    python benchmarks/rms_norm.py --shapes 2048x16 --json out.json
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from gpu_timing import (  # siblings: benchmarks/ is on sys.path
    fastest, graphed, ms, print_speedups, require_cuda, shapes_parser, token_shapes,
    write_json)

from kernels.rms_norm import triton_rms_norm as T

HIDDEN = 1024
DT = torch.bfloat16
EPS = 1e-5
TILES = [(elements, warps) for elements in (1024, 2048, 4096, 8192, 16384) for warps in (4, 8, 16)]
ROWS_PER_PROGRAM = (16, 32, 64, 128, 256)


def inputs(s, b, d=HIDDEN):
    x = torch.randn(s, b, d, device="cuda", dtype=DT)
    w = 1 + 0.2 * torch.randn(d, device="cuda", dtype=DT)
    return x, w, torch.randn_like(x)


METHODS = {  # torch: what torch.nn.RMSNorm's forward calls
    "torch": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
    "triton": lambda x, w: T.rms_norm_triton(x, w, EPS),
}


def fwd_bwd(fn, x, w, dy):
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(xg, wg), (xg, wg), dy)


def rows_for(s, b, bw_tbs):
    x, w, dy = inputs(s, b)
    nbytes = x.numel() * x.element_size()
    rows = []
    for name, fn in METHODS.items():
        with torch.no_grad():
            fwd = graphed(lambda: fn(x, w))
            t_f, t_f_eager = ms(fwd), ms(lambda: fn(x, w))
        step = fwd_bwd(fn, x, w, dy)
        t_fb, t_fb_eager = ms(graphed(step)), ms(step)
        rows.append(dict(method=name, s=s, b=b, d=x.shape[-1], fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         eager_fwd_ms=t_f_eager, eager_fwd_bwd_ms=t_fb_eager,
                         fwd_floor_ms=2 * nbytes / bw_tbs / 1e9,
                         fwd_bwd_floor_ms=5 * nbytes / bw_tbs / 1e9))
    return rows


def _apply(setting: dict) -> None:
    for key, value in setting.items():
        setattr(T, key, value)


def tune(s=2048, b=16):
    """Forward and backward kernels alone: the forward's tile, then the backward's tile with
    its rows per program."""
    x, w, dy = inputs(s, b)
    x, dy = x.view(-1, x.shape[-1]), dy.view(-1, x.shape[-1])
    _, rstd = T.forward(x, w, EPS)
    graph_ms = lambda run: ms(graphed(run))  # noqa: E731
    fastest("forward", [{"FWD_CONFIG": tile} for tile in TILES], _apply,
            lambda: T.forward(x, w, EPS), graph_ms)
    fastest("backward", [{"BWD_CONFIG": tile, "BWD_ROWS_PER_PROGRAM": n}
                         for tile, n in itertools.product(TILES, ROWS_PER_PROGRAM)], _apply,
            lambda: T.backward(x, w, rstd, dy, True), graph_ms)


def main():
    args = shapes_parser("sweep the kernels' tiles and warps first").parse_args()
    require_cuda("benchmarks/rms_norm.py needs a CUDA GPU (the Triton kernels run only there)")
    if args.tune:
        tune()
    print(f"kernel configs (elements per tile, warps): forward {T.FWD_CONFIG}, backward "
          f"{T.BWD_CONFIG} over {T.BWD_ROWS_PER_PROGRAM} rows per program")
    rows = [row for s, b in token_shapes(args.shapes) for row in rows_for(s, b, args.bandwidth)]
    print_speedups(rows, "torch", lambda r: f"{r['s']}x{r['b']}x{r['d']}")
    print(f"floors at {args.bandwidth} TB/s: forward x read and y written; forward + backward "
          "also x and dy read and dx written")
    write_json(args.json, fwd_config=T.FWD_CONFIG, bwd_config=T.BWD_CONFIG,
               bwd_rows_per_program=T.BWD_ROWS_PER_PROGRAM, bandwidth_tbs=args.bandwidth, rows=rows)

if __name__ == "__main__":
    main()
