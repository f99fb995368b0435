"""BaseConv's gate and sliding-window attention: the fast paths against the paths they replace.

BaseConv gate, y = silu(conv(u1)) * u2 from in_proj's output u [s, b, 2c] and its bias [2c]
(bf16, c = 2048 as in jrt-360m at TP=1; grads to u, the conv weight and the bias):
  former   the bias add (megatron's in in_proj), chunk, permute, cat of a zero tail, F.conv1d
           depthwise, silu, permute, multiply
  fused    kernels/baseconv's Triton kernel, adding the bias as it reads u (the mixer on CUDA now)
  compiled torch.compile of the plain reference (for the record; --no-compile skips it)
Sliding-window attention (16 heads, d 64, window 128, bf16; q, k, v are views of one mixed
[s, b, h, 3d] tensor as megatron's SelfAttention hands them over; grads to it; including the
core's [s, b, h*d] output layout):
  blocked  the former path: pad, unfold, band mask, SDPA on blocks (still the CPU path)
  flash    FlashAttention-2 local window through torch.nn.attention.varlen (the CUDA path now)
  flex     compiled FlexAttention with a sliding-window block mask (for the record)
Lengths 2k, 8k, 32k with micro batches 8, 2, 1 (the same tokens per step at 2k and 8k).
Prints forward and forward+backward ms, peak extra memory, speed-ups over the former paths, and
for the conv the fraction of the copy bandwidth (fewest bytes: u, dy read once, y, du written once).

    python benchmarks/mixers.py
    python benchmarks/mixers.py --tune            # sweep the conv kernel's block sizes first
    python benchmarks/mixers.py --lengths 2048 --json out.json
"""
from __future__ import annotations

import argparse

import torch
from gpu_timing import (  # siblings: benchmarks/ is on sys.path
    fastest, ms, peak_mib, require_cuda, write_json)

from kernels.baseconv.reference import gated_causal_conv_conv1d, gated_causal_conv_reference
from kernels.baseconv import triton_baseconv as T
from megatron_jrt.mixers import swa

BATCH = {2048: 8, 8192: 2, 32768: 1}
CONV_C, HEADS, HEAD_DIM, WINDOW = 2048, 16, 64, 128
DT = torch.bfloat16
DEVICE = "cuda"


def copy_gbs():
    x = torch.empty(2**30, dtype=DT, device=DEVICE)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / (ms(lambda: y.copy_(x)) * 1e-3) / 1e9


# ----------------------------------------------------------------------------- BaseConv gate
def conv_inputs(s, b, c=CONV_C, k=3):
    u = torch.randn(s, b, 2 * c, device=DEVICE, dtype=DT, requires_grad=True)
    w = (torch.randn(c, 1, k, device=DEVICE, dtype=DT) * 0.3).requires_grad_()
    bias = torch.randn(2 * c, device=DEVICE, dtype=DT, requires_grad=True)
    dy = torch.randn(s, b, c, device=DEVICE, dtype=DT)
    return (u, w, bias), dy


def former(u, w, bias):
    return gated_causal_conv_conv1d(u + bias, w)


def fused(u, w, bias):
    return T.gated_causal_conv_triton(u, w, None, bias)


def reference(u, w, bias):
    return gated_causal_conv_reference(u, w, bias=bias)


def fwd_bwd(fn, inputs, dy):
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dy)


def conv_rows(s, b, bw, compile_ref):
    inputs, dy = conv_inputs(s, b)
    methods = {"former": former, "fused": fused}
    if compile_ref:
        methods["compiled"] = torch.compile(reference)
    # fewest bytes: forward reads u, writes y; backward reads u, dy, writes du (w is tiny)
    c = CONV_C
    fwd_bytes = s * b * 3 * c * 2
    fb_bytes = fwd_bytes + s * b * 5 * c * 2
    rows = []
    for name, fn in methods.items():
        try:
            with torch.no_grad():
                t_f = ms(lambda: fn(*inputs))
            step = fwd_bwd(fn, inputs, dy)
            t_fb = ms(step)
            mem = peak_mib(step)
        except Exception as e:  # e.g. the compiler missing on this machine
            print(f"  conv {name} s{s} b{b}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append(dict(op="conv", method=name, s=s, b=b, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         peak_mib=mem, fwd_bw_frac=fwd_bytes / (t_f * 1e-3) / 1e9 / bw,
                         fwd_bwd_bw_frac=fb_bytes / (t_fb * 1e-3) / 1e9 / bw))
    return rows


# forward (tokens, channels, warps); the backward's da pass (tokens per tile, channels, warps,
# tiles) and du1 pass (tokens, channels, warps)
TUNE = {"fwd": [(32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 8), (64, 64, 4), (128, 64, 4)],
        "bwd": [(16, 64, 2, 8), (16, 128, 4, 4), (32, 128, 4, 2), (32, 64, 4, 4), (64, 64, 4, 2),
                (8, 128, 4, 8), (32, 128, 8, 4), (16, 256, 8, 4)],
        "bwd_du1": [(32, 128, 4), (64, 128, 4), (64, 64, 4), (16, 256, 4), (128, 64, 8),
                    (32, 64, 2)]}


def tune(s=2048, b=8):
    inputs, dy = conv_inputs(s, b)
    for kind in TUNE:
        run = ((lambda: fused(*(x.detach() for x in inputs))) if kind == "fwd"
               else fwd_bwd(fused, inputs, dy))
        fastest(kind, TUNE[kind], lambda cfg: T._CFG.__setitem__(kind, cfg), run)


# ----------------------------------------------------------------------------- SWA
def core(fn):
    """SelfAttention's core around an attention function: [s, b, h, d] views in, the
    [s, b, h*d] output (megatron_jrt.mixers.attention.CoreAttention.forward)."""
    def run(mixed):
        q, k, v = (t.permute(1, 2, 0, 3) for t in mixed.split(HEAD_DIM, dim=-1))
        out = fn(q, k, v, WINDOW)
        s, b = mixed.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
    return run


def flex_fn():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention)
    masks = {}

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= WINDOW)

    def attend(q, k, v, window):
        n = q.shape[2]
        if n not in masks:
            masks[n] = create_block_mask(sliding, None, None, n, n, device=q.device)
        return compiled(q, k, v, block_mask=masks[n])
    return attend


def swa_rows(s, b, with_flex):
    mixed = torch.randn(s, b, HEADS, 3 * HEAD_DIM, device=DEVICE, dtype=DT, requires_grad=True)
    dy = torch.randn(s, b, HEADS * HEAD_DIM, device=DEVICE, dtype=DT)
    methods = {"blocked": swa.blocked_sliding_window_attention,
               "flash": swa._flash_sliding_window}
    if with_flex:
        methods["flex"] = flex_fn()
    rows = []
    for name, fn in methods.items():
        run = core(fn)
        try:
            with torch.no_grad():
                t_f = ms(lambda: run(mixed))
            step = fwd_bwd(run, (mixed,), dy)
            t_fb = ms(step)
            mem = peak_mib(step)
        except Exception as e:
            print(f"  swa {name} s{s} b{b}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append(dict(op="swa", method=name, s=s, b=b, fwd_ms=t_f, fwd_bwd_ms=t_fb,
                         peak_mib=mem))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,8192,32768")
    ap.add_argument("--tune", action="store_true", help="sweep the conv kernel's block sizes first")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled reference and flex")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require_cuda("benchmarks/mixers.py needs a CUDA GPU")
    if args.tune:
        tune()
    print(f"conv kernel configs: {T._CFG} (fwd, bwd_du1: tokens, channels, warps; "
          "bwd: tokens, channels, warps, tiles)")
    bw = copy_gbs()
    print(f"copy bandwidth {bw:.0f} GB/s")
    rows = []
    for s in (int(x) for x in args.lengths.split(",")):
        b = BATCH.get(s, max(1, 16384 // s))
        rows += conv_rows(s, b, bw, not args.no_compile)
        rows += swa_rows(s, b, not args.no_compile)
    for row in rows:  # speed-ups over the former path of the same op and shape
        base = next(r for r in rows if r["op"] == row["op"] and r["s"] == row["s"]
                    and r["method"] in ("former", "blocked"))
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    print(f"\n{'op':5} {'method':9} {'s':>6} {'b':>2} {'fwd ms':>8} {'x':>6} {'fwd+bwd ms':>11} "
          f"{'x':>6} {'peak MiB':>9} {'bw fwd/f+b':>11}")
    for r in rows:
        bwf = (f"{r['fwd_bw_frac']:.0%}/{r['fwd_bwd_bw_frac']:.0%}" if "fwd_bw_frac" in r else "")
        print(f"{r['op']:5} {r['method']:9} {r['s']:6d} {r['b']:2d} {r['fwd_ms']:8.3f} "
              f"{r['fwd_speedup']:5.2f}x {r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_speedup']:5.2f}x "
              f"{r['peak_mib']:9.0f} {bwf:>11}")
    # What it means for one jrt-360m step at that shape (16 BaseConv and 5 SWA layers)
    for s in sorted({r["s"] for r in rows}):
        def t(op, method):
            return next((r["fwd_bwd_ms"] for r in rows if (r["op"], r["method"], r["s"])
                         == (op, method, s)), float("nan"))
        saved = (16 * (t("conv", "former") - t("conv", "fused"))
                 + 5 * (t("swa", "blocked") - t("swa", "flash")))
        print(f"s {s}, b {BATCH.get(s, max(1, 16384 // s))}: a jrt-360m step's 16 BaseConv and "
              f"5 SWA layers, forward+backward, take {saved:.1f} ms less")
    write_json(args.json, conv_cfg=T._CFG, copy_gbs=bw, rows=rows)


if __name__ == "__main__":
    main()
