"""PLA kernel benchmark: this kernel vs SDPA (FlashAttention backend) vs fla's fused_chunk_based.

Paper setup (JRT_SPEC.md section 6): B=16, H=16, f=16, dv=64, bf16, encoder region N/2.
Prints forward / prefill / forward+backward times, speed-ups, the fraction of the
memory-bandwidth roofline (fewest bytes: every input read once, every output written once,
over a measured device-to-device copy bandwidth), and the decode step vs its bound
(reading and writing the fp32 state once).

    python benchmarks/pla.py                 # full table
    python benchmarks/pla.py --tune red,fwd,dq,dkv,enc   # sweep launch configs (incl. sequence splits) first
    python benchmarks/pla.py --lengths 2048,8192 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
from gpu_timing import ms  # a sibling: benchmarks/ is on sys.path

from kernels.pla import triton_pla as T

B, H, F = 16, 16, 16


def bandwidth_gbs():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    t = ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (t * 1e-3) / 1e9


def inputs(N, M, dv, b=B, h=H, requires_grad=False):
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)
    return r(b, h, N, F), r(b, h, N, F), r(b, h, N, dv), r(b, h, M, F), r(b, h, M, dv)


def fwd_bytes(N, M, dv):
    return 2 * B * H * (N * (2 * F + 2 * dv) + M * (F + dv))


def fwdbwd_bytes(N, M, dv):
    # forward: read q,k,v,ke,ve, write y; backward: read q,k,v,ke,ve,dy, write all five grads
    return 2 * B * H * (N * (2 * F + 2 * dv) + M * (F + dv)) + 2 * B * H * (2 * N * (2 * F + dv) + N * dv + 2 * M * (F + dv))


def fwd_flops(N, M, dv, C=64):
    """Useful forward work on the packed state (161 rows: 1 + 16 + 136 pairs + 8 padding): readout and
    update per token, the causal chunk, the encoder update."""
    D = T.D_PACKED
    return 2 * B * H * (N * (2 * D * dv + C * F + C * dv) + M * D * dv)


# ----------------------------------------------------------------------------- tuning
# (chunk, dv block, warps, stages, waves); waves = sequence splits aiming at waves x SM-count programs
# (0 = one split per sequence). One list per kernel kind; the backward kinds are timed as forward+backward.
CANDIDATES = {
    "red": [(64, 64, 4, 1, 0), (128, 64, 8, 1, 0), (32, 64, 4, 1, 0)],
    "fwd": [(64, 64, 4, 1, 1), (32, 64, 4, 1, 1), (64, 64, 4, 2, 1), (64, 64, 8, 1, 1), (64, 64, 4, 1, 2)],
    "dq": [(32, 64, 4, 1, 0), (32, 64, 4, 2, 0), (64, 64, 4, 1, 0), (16, 64, 4, 1, 0)],
    "dkv": [(32, 64, 4, 1, 1), (32, 64, 4, 2, 1), (32, 64, 4, 3, 1), (64, 64, 4, 1, 1), (16, 64, 4, 1, 1), (32, 64, 4, 1, 2)],
    "enc": [(32, 64, 4, 1, 0), (64, 64, 4, 1, 0), (16, 64, 4, 1, 0)],
}


def tune(dv, N=4096, log=print, kinds=("fwd", "dkv")):
    M = N // 2
    best = {}
    x = inputs(N, M, dv)
    for kind in kinds:
        res = []
        for C, BV, nw, ns, waves in CANDIDATES[kind]:
            T._CFG[(kind, dv)] = dict(C=C, BV=BV, num_warps=nw, num_stages=ns, waves=waves)
            try:
                if kind == "red":
                    t = ms(lambda: T._encoder(x[3], x[4]), rep=50)
                elif kind == "fwd":
                    t = ms(lambda: T._forward(*x, 1e-12, False, True), rep=50)
                else:
                    t = ms(fwdbwd(T.pla_triton, x), rep=100)
            except Exception as e:  # out of resources etc.
                log(f"  tune {kind} dv{dv} N{N} C{C} BV{BV} w{nw} s{ns} waves{waves}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            log(f"  tune {kind} dv{dv} N{N} C{C} BV{BV} w{nw} s{ns} waves{waves}: {t:.3f} ms")
            res.append((t, (C, BV, nw, ns, waves)))
        t, (C, BV, nw, ns, waves) = min(res)
        best[kind] = dict(C=C, BV=BV, num_warps=nw, num_stages=ns, waves=waves)
        T._CFG[(kind, dv)] = best[kind]
        log(f"best {kind} dv{dv} N{N}: {best[kind]} {t:.3f} ms")
    del x
    torch.cuda.empty_cache()
    return best


# ----------------------------------------------------------------------------- baselines
def sdpa_fn(N):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def f(q=q, k=k, v=v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return f, (q, k, v)


def fla_fn(N):
    from fla.ops.based import fused_chunk_based
    q, k = (torch.randn(B, N, H, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, N, H, 64, device="cuda", dtype=torch.bfloat16)
    return (lambda q=q, k=k, v=v: fused_chunk_based(q, k, v)), (q, k, v)


def fwdbwd(f, args):
    """Forward + backward to all inputs (torch.autograd.grad: no accumulation into .grad, for every method)."""
    args = [a.detach().clone().requires_grad_() for a in args]
    dy = torch.randn_like(f(*args))
    return lambda: torch.autograd.grad(f(*args), args, dy)


# ----------------------------------------------------------------------------- decode
def decode_bench(dv, bw, b=B, h=H):
    D = 1 + F + F * F
    S = torch.randn(b, h, D, dv, device="cuda")
    z = torch.rand(b, h, D, device="cuda") + 1
    st = T.PLAState(S, z)
    q, k = (torch.randn(b, h, F, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(b, h, dv, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(v)
    T.pla_decode_step_triton(q, k, v, st, out=y)
    steps = 20
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(steps):
            T.pla_decode_step_triton(q, k, v, st, out=y)
    t = ms(g.replay) / steps
    nbytes = 2 * 4 * b * h * D * (dv + 1) + 2 * b * h * (2 * F + 2 * dv)
    bound = nbytes / (bw * 1e9) * 1e3
    from kernels.pla.reference import pla_decode_step
    st2 = T.PLAState(S.clone(), z.clone())
    t_ref = ms(lambda: pla_decode_step(q, k, v, st2))
    return dict(dv=dv, ms=t, bound_ms=bound, ratio=t / bound, ref_ms=t_ref, gbs=nbytes / (t * 1e-3) / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--bwd-lengths", default="2048,4096,8192,16384")
    ap.add_argument("--tune", default="", help="comma list of kinds to tune first: red,fwd,dq,dkv,enc")
    ap.add_argument("--tune-n", type=int, default=8192, help="sequence length for tuning")
    ap.add_argument("--tune-dv", default="64,112")
    ap.add_argument("--no-table", action="store_true", help="stop after --tune (no benchmark table)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    log = lambda *a: print(*a, flush=True)
    dev = torch.cuda.get_device_name()
    bw = bandwidth_gbs()
    log(f"device {dev}; torch {torch.__version__}; triton {triton.__version__}; copy bandwidth {bw:.0f} GB/s")
    out = dict(device=dev, torch=torch.__version__, triton=triton.__version__, bandwidth_gbs=bw, rows=[], decode=[], tuned={})
    if args.tune:
        for dv in [int(d) for d in args.tune_dv.split(",")]:
            out["tuned"][dv] = tune(dv, N=args.tune_n, log=log, kinds=args.tune.split(","))
    if args.no_table:
        return
    log("configs in use: " + json.dumps({f"{k[0]}/{k[1]}": v for k, v in T._CFG.items()} or {"default": T._CFG_DEFAULT}))
    try:
        import fla  # noqa: F401
        have_fla = True
    except Exception as e:
        log(f"fla not importable: {e}")
        have_fla = False
    dv = 64
    for N in [int(n) for n in args.lengths.split(",")]:
        M = N // 2
        row = dict(N=N, M=M)
        x = inputs(N, M, dv)
        with torch.no_grad():
            row["pla_fwd"] = ms(lambda: T.pla_triton(*x))
            row["pla_prefill"] = ms(lambda: T.pla_prefill_triton(*x))
            if T._gluon(x[0], x[2]) is not None:  # baseline: the Triton kernels the Gluon ones replace here
                T._GLUON = False
                row["triton_only_fwd"] = ms(lambda: T.pla_triton(*x))
                row["triton_only_prefill"] = ms(lambda: T.pla_prefill_triton(*x))
                T._GLUON = True
        f, a = sdpa_fn(N)
        with torch.no_grad():
            row["sdpa_fwd"] = ms(lambda: f(*a))
        if have_fla:
            g, ga = fla_fn(N)
            with torch.no_grad():
                row["fla_fwd"] = ms(lambda: g(*ga))
        if N in [int(n) for n in args.bwd_lengths.split(",")]:
            row["pla_fwdbwd"] = ms(fwdbwd(T.pla_triton, x))
            row["sdpa_fwdbwd"] = ms(fwdbwd(f, a))
            if have_fla:
                row["fla_fwdbwd"] = ms(fwdbwd(g, ga))
        row["roofline_fwd"] = fwd_bytes(N, M, dv) / (bw * 1e9) / (row["pla_fwd"] * 1e-3)
        row["roofline_prefill"] = fwd_bytes(N, M, dv) / (bw * 1e9) / (row["pla_prefill"] * 1e-3)
        row["tflops_fwd"] = fwd_flops(N, M, dv) / (row["pla_fwd"] * 1e-3) / 1e12
        if "pla_fwdbwd" in row:
            row["roofline_fwdbwd"] = fwdbwd_bytes(N, M, dv) / (bw * 1e9) / (row["pla_fwdbwd"] * 1e-3)
        out["rows"].append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        del x, a
        torch.cuda.empty_cache()
    # head value dim 112 (the 1.3B preset) at the paper's batch
    x = inputs(8192, 4096, 112)
    with torch.no_grad():
        r = dict(dv=112, N=8192, pla_prefill=ms(lambda: T.pla_prefill_triton(*x)))
    r["pla_fwdbwd"] = ms(fwdbwd(T.pla_triton, x))
    out["dv112"] = r
    log(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}))
    del x
    # small batches: sequence splits (configured waves) vs one split per (b, h) (the first version)
    for b_, N in [(1, 32768), (2, 8192), (1, 8192)]:
        x = inputs(N, N // 2, dv, b=b_, h=H)
        r = dict(B=b_, H=H, N=N)
        for name, waves in (("split", None), ("nosplit", 0)):
            saved = {k_: dict(v_) for k_, v_ in T._CFG.items()}
            if waves is not None:
                for kind in ("fwd", "dkv"):
                    T._CFG[(kind, dv)] = dict(T._cfg(dv, kind), waves=waves)
            with torch.no_grad():
                r[f"prefill_{name}"] = ms(lambda: T.pla_prefill_triton(*x))
            r[f"fwdbwd_{name}"] = ms(fwdbwd(T.pla_triton, x))
            T._CFG.clear(), T._CFG.update(saved)
        out.setdefault("small_batch", []).append(r)
        log(json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}))
        del x
    for dv_ in (64, 112):
        r = decode_bench(dv_, bw)
        out["decode"].append(r)
        log(json.dumps({k: round(v, 5) for k, v in r.items()}))

    # table
    log(f"\n{dev}, B={B} H={H} f={F} dv=64 bf16, encoder N/2; times in ms (median, triton do_bench)")
    log("| N | PLA fwd | PLA prefill | SDPA fwd | fla Based fwd | prefill vs SDPA | prefill vs fla | roofline (prefill) | PLA fwd+bwd | SDPA fwd+bwd | fla fwd+bwd | fwd+bwd vs SDPA |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        g = lambda k: f"{r[k]:.3f}" if k in r else "-"
        ratio = lambda a, b: f"{r[a] / r[b]:.1f}x" if a in r and b in r else "-"
        log(f"| {r['N']} | {g('pla_fwd')} | {g('pla_prefill')} | {g('sdpa_fwd')} | {g('fla_fwd')} | {ratio('sdpa_fwd', 'pla_prefill')} | "
            f"{ratio('fla_fwd', 'pla_prefill')} | {r['roofline_prefill']:.0%} | {g('pla_fwdbwd')} | {g('sdpa_fwdbwd')} | {g('fla_fwdbwd')} | "
            f"{ratio('sdpa_fwdbwd', 'pla_fwdbwd')} |")
    log("| decode dv | ms/step | bound ms | ratio to bound | GB/s | torch reference ms |")
    log("|---|---|---|---|---|---|")
    for r in out["decode"]:
        log(f"| {r['dv']} | {r['ms']:.4f} | {r['bound_ms']:.4f} | {r['ratio']:.2f} | {r['gbs']:.0f} | {r['ref_ms']:.3f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
