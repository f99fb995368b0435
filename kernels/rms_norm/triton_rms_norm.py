"""Fused Triton kernels for RMSNorm (kernels/rms_norm/reference.py), forward and backward.

torch.nn.RMSNorm's backward is two kernels, and its weight gradient (GammaBetaBackward) alone
costs twice the input gradient at [2048 x 16, 1024] bf16. Here each direction is one pass over
the rows, memory bound, fp32 math in registers whatever the dtypes; between the two only x and
the fp32 rstd = 1 / sqrt(mean(x^2) + eps) of each row are kept (not the output):

  _forward_kernel   y = x * rstd * w, per tile of rows (several rows per program at d = 1024)
  _backward_kernel  dx = rstd * (w dy - x_hat * mean(w dy x_hat)) with x_hat = x * rstd, per
                    row; and the program's partial dw = sum of dy x_hat over its rows, fp32,
                    into a [programs, d] buffer that torch sums: deterministic, no atomics.

Rows are x reshaped to [rows, d] (copied only when not contiguous); d up to MAX_D in one tile
of BLOCK_D = next_power_of_2(d) columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per kernel (elements per tile, warps): a program's tile is max(1, tile // BLOCK_D) rows, and a
# row wider than the tile gets at least BLOCK_D // ELEMENTS_PER_WARP warps (16 fp32 elements per
# thread). The backward walks BWD_ROWS_PER_PROGRAM rows, tile by tile, per partial dw: fewer
# means more programs in flight and more partials to sum. Chosen on an H200 at 2048 x 16 x 1024
# in bf16 (forward 0.039 ms, backward with the partials' sum 0.072 ms; torch's 0.047 and 0.18):
# 16 to 64 rows per program are within 5%, 128 is 20% slower, 8 warps 1.6x slower than 4.
# benchmarks/rms_norm.py --tune sweeps them.
FWD_CONFIG = (4096, 4)
BWD_CONFIG = (4096, 4)
BWD_ROWS_PER_PROGRAM = 64
ELEMENTS_PER_WARP = 512
MAX_WARPS = 32
MAX_D = 16384
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype in DTYPES and weight.dtype in DTYPES and x.dim() >= 1 and weight.dim() == 1
            and 0 < x.shape[-1] <= MAX_D and weight.shape[0] == x.shape[-1])


# Addresses: an int64 base per tile (rows x d passes 2^31 at 2M rows of 1024), int32 offsets
# within it.
@triton.jit
def _forward_kernel(X, W, Y, RSTD, rows, d, eps, BLOCK_ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    first = tl.program_id(0) * BLOCK_ROWS
    r = tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, BLOCK_D)
    mr, mc = first + r < rows, c < d
    m = mr[:, None] & mc[None, :]
    offs = r[:, None] * d + c[None, :]
    base = first.to(tl.int64) * d
    x = tl.load(X + base + offs, mask=m, other=0.).to(tl.float32)
    rstd = 1. / tl.sqrt(tl.sum(x * x, axis=1) / d + eps)
    w = tl.load(W + c, mask=mc, other=0.).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + first + r, rstd, mask=mr)


@triton.jit
def _backward_kernel(X, W, DY, RSTD, DX, DWP, rows, d, TILES: tl.constexpr,
                     HAS_DW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx of TILES tiles of rows, and (HAS_DW) their sum of dy x_hat into DWP[program]."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_ROWS)
    c = tl.arange(0, BLOCK_D)
    mc = c < d
    offs = r[:, None] * d + c[None, :]
    w = tl.load(W + c, mask=mc, other=0.).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tile in range(TILES):
        first = (pid * TILES + tile) * BLOCK_ROWS
        mr = first + r < rows
        m = mr[:, None] & mc[None, :]
        base = first.to(tl.int64) * d
        x = tl.load(X + base + offs, mask=m, other=0.).to(tl.float32)
        dy = tl.load(DY + base + offs, mask=m, other=0.).to(tl.float32)
        rstd = tl.load(RSTD + first + r, mask=mr, other=0.)
        x_hat = x * rstd[:, None]
        wdy = dy * w[None, :]
        mean = tl.sum(wdy * x_hat, axis=1) / d
        dx = (wdy - x_hat * mean[:, None]) * rstd[:, None]
        tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_DW:
            dw += tl.sum(dy * x_hat, axis=0)
    if HAS_DW:
        tl.store(DWP + pid.to(tl.int64) * d + c, dw, mask=mc)


def _tile(config: tuple[int, int], d: int) -> tuple[int, int, int]:
    """(rows per tile, BLOCK_D, warps) for rows of d columns."""
    elements, warps = config
    block_d = triton.next_power_of_2(d)
    warps = min(MAX_WARPS, max(warps, block_d // ELEMENTS_PER_WARP))
    return max(1, elements // block_d), block_d, warps


def forward(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, d] contiguous, w [d] -> (y [rows, d] in x's dtype, rstd [rows] fp32)."""
    rows, d = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        block_rows, block_d, warps = _tile(FWD_CONFIG, d)
        _forward_kernel[(triton.cdiv(rows, block_rows),)](
            x, w, y, rstd, rows, d, eps, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
            num_warps=warps)
    return y, rstd


def backward(x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor,
             need_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx [rows, d] in x's dtype, dw [d] fp32 or None) of x, dy [rows, d] contiguous."""
    rows, d = x.shape
    block_rows, block_d, warps = _tile(BWD_CONFIG, d)
    tiles = max(1, min(BWD_ROWS_PER_PROGRAM // block_rows, triton.cdiv(rows, block_rows)))
    programs = triton.cdiv(rows, block_rows * tiles)
    dx = torch.empty_like(x)
    # every program writes its row of partials (none for zero rows: their sum is zero)
    parts = torch.empty(programs if need_dw else 1, d, device=x.device, dtype=torch.float32)
    if rows:
        _backward_kernel[(programs,)](
            x, w, dy, rstd, dx, parts, rows, d, TILES=tiles, HAS_DW=need_dw,
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps)
    return dx, parts.sum(0) if need_dw else None


class RMSNormFunction(torch.autograd.Function):
    """Saves x (as rows) and the fp32 rstd per row; differentiable in x and weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        d = x.shape[-1]
        rows = x.reshape(-1, d)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        w = weight.contiguous()
        y, rstd = forward(rows, w, eps)
        ctx.save_for_backward(rows, w, rstd)
        ctx.shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        dy = dy.reshape(x.shape)
        if not dy.is_contiguous():
            dy = dy.contiguous()
        dx, dw = backward(x, w, rstd, dy, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), None if dw is None else dw.to(ctx.weight_dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight: x [..., d], weight [d] -> [..., d] in x's
    dtype."""
    return RMSNormFunction.apply(x, weight, eps)
