"""Fused Triton kernels for the vocabulary cross entropy (kernels/cross_entropy/reference.py).

Megatron's native fused loss makes fp32 copies of the logits, exponentiates them in place and
saves the softmax for the backward: about ten passes over [tokens, vocabulary] fp32 data. These
kernels read the logits (bf16 in training) once forward and once backward, and write the
gradient once, in the logits' dtype, with fp32 math in registers; only per-token fp32 values
are kept between the two (the log-sum-exp), so nothing of vocabulary size is saved but the
logits themselves. One program per token (row), walking its columns in blocks:

  _forward_kernel   online max and sum of exp over this rank's slice -> the slice's log-sum-exp,
                    and the label's logit when the label falls in the slice (else 0)
  _backward_kernel  d logits = (exp(x - lse) - [column == label]) * d loss

Between them, in torch: with tensor parallelism the slices' log-sum-exps are combined
(all-reduce MAX, then SUM of the rescaled exponentials together with the label logits), so the
kernels need no communication and TP=1 needs none either.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.cross_entropy.reference import vocab_range

# (columns per block, warps) per kernel; benchmarks/cross_entropy.py --tune sweeps them.
FWD_CONFIG = (2048, 4)
BWD_CONFIG = (8192, 32)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(logits: torch.Tensor) -> bool:
    return logits.dtype in DTYPES and logits.dim() >= 1 and logits.shape[-1] > 0


# Row offsets are int64 (tokens x vocabulary passes 2^31 at 43k tokens of 50k columns); column
# offsets within a row stay int32. Widths and row strides arrive as multiples of ALIGN (a power
# of two dividing them, up to 16): triton specializes integer arguments only on divisibility by
# 16, and 50264 is 8 x 6283, so without it every load of a row and its mask `c < V` would be
# assumed unaligned and issued one element at a time instead of in 16-byte vectors.
@triton.jit
def _forward_kernel(X, LABELS, LSE, LABEL_LOGIT, v_units, stride_units, vocab_start,
                    ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """The row's max is reduced per block; its sum of exponentials stays per lane, rescaled
    when the max grows, and is reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    V = v_units * ALIGN
    x_row = X + row * (stride_units * ALIGN)
    cols = tl.arange(0, BLOCK)
    m = float("-inf")  # running max
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # per lane, sum of exp(x - m)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    target = tl.load(LABELS + row) - vocab_start
    inside = (target >= 0) & (target < V)
    label_logit = tl.load(x_row + tl.where(inside, target, 0), mask=inside, other=0.)
    tl.store(LSE + row, m + tl.log(tl.sum(acc, axis=0)))
    tl.store(LABEL_LOGIT + row, label_logit.to(tl.float32))


@triton.jit
def _backward_kernel(X, LABELS, LSE, DLOSS, DX, v_units, stride_units, dx_stride_units,
                     vocab_start, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """DX may be X (the same strides): each element is read before it is written, by the
    same thread."""
    row = tl.program_id(0).to(tl.int64)
    V = v_units * ALIGN
    x_row = X + row * (stride_units * ALIGN)
    dx_row = DX + row * (dx_stride_units * ALIGN)
    lse = tl.load(LSE + row)
    g = tl.load(DLOSS + row)
    target = tl.load(LABELS + row) - vocab_start
    target = tl.where((target >= 0) & (target < V), target, -1).to(tl.int32)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        c = start + cols
        mask = c < V
        x = tl.load(x_row + c, mask=mask, other=0.).to(tl.float32)
        dx = (tl.exp(x - lse) - tl.where(c == target, 1., 0.)) * g
        tl.store(dx_row + c, dx.to(DX.dtype.element_ty), mask=mask)


def _align(*sizes: int) -> int:
    """The largest power of two up to 16 that divides every size (in elements)."""
    align = 16
    while any(n % align for n in sizes):
        align //= 2
    return align


def _block(config: tuple[int, int], v: int) -> tuple[int, int]:
    block, warps = config
    return min(block, triton.next_power_of_2(v)), warps


def local_lse_and_label_logit(x: torch.Tensor, labels: torch.Tensor,
                              vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, v] (unit column stride), labels [rows] global ids -> (log-sum-exp of each row,
    the label's logit where the label is in [vocab_start, vocab_start + v), else 0), fp32."""
    rows, v = x.shape
    lse = torch.empty(rows, device=x.device, dtype=torch.float32)
    label_logit = torch.empty_like(lse)
    if rows:
        block, warps = _block(FWD_CONFIG, v)
        a = _align(v, x.stride(0))
        _forward_kernel[(rows,)](x, labels, lse, label_logit, v // a, x.stride(0) // a,
                                 vocab_start, ALIGN=a, BLOCK=block, num_warps=warps)
    return lse, label_logit


def logits_grad(x: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, dloss: torch.Tensor,
                vocab_start: int, out: torch.Tensor) -> torch.Tensor:
    """out [rows, v] = (exp(x - lse) - onehot(labels - vocab_start)) * dloss[:, None], in out's
    dtype; `out` may be x itself. lse, dloss: fp32 [rows]."""
    rows, v = x.shape
    if rows:
        block, warps = _block(BWD_CONFIG, v)
        a = _align(v, x.stride(0), out.stride(0))
        _backward_kernel[(rows,)](x, labels, lse, dloss, out, v // a, x.stride(0) // a,
                                  out.stride(0) // a, vocab_start, ALIGN=a, BLOCK=block,
                                  num_warps=warps)
    return out


def _combine(lse: torch.Tensor, label_logit: torch.Tensor,
             tp_group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The global log-sum-exp and label logit from every rank's slice: two all-reduces of
    [rows] fp32 (the sums batched into one)."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=tp_group)
    sums = torch.stack([torch.exp(lse - top), label_logit])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    return top + torch.log(sums[0]), sums[1]


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Saves the logits (copied only when they cannot be seen as rows of unit column stride),
    the labels and the fp32 log-sum-exp; `inplace_backward` writes the gradient over the saved
    logits."""

    @staticmethod
    def forward(ctx, logits, labels, tp_group, inplace_backward):
        v = logits.shape[-1]
        x = logits.reshape(-1, v)  # a view for megatron's contiguous [s, b, v]
        if x.stride(-1) != 1:
            x = x.contiguous()
        y = labels.reshape(-1).contiguous()
        start, ranks = vocab_range(v, tp_group)
        lse, label_logit = local_lse_and_label_logit(x, y, start)
        if ranks > 1:
            lse, label_logit = _combine(lse, label_logit, tp_group)
        ctx.save_for_backward(x, y, lse)
        ctx.vocab_start, ctx.inplace, ctx.shape = start, inplace_backward, logits.shape
        return (lse - label_logit).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, dloss):
        x, y, lse = ctx.saved_tensors
        dloss = dloss.reshape(-1).float().contiguous()
        out = x if ctx.inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        logits_grad(x, y, lse, dloss, ctx.vocab_start, out)
        if ctx.inplace:
            # Triton's write is invisible to autograd: a second backward through these
            # logits (retain_graph) must fail loudly rather than read gradients as logits.
            torch.autograd.graph.increment_version(x)
        return out.view(ctx.shape), None, None, None


def vocab_parallel_cross_entropy_triton(logits: torch.Tensor, labels: torch.Tensor,
                                        tp_group: dist.ProcessGroup | None = None,
                                        inplace_backward: bool = False) -> torch.Tensor:
    """Per-token fp32 loss [...] of logits [..., v_local] (this rank's vocabulary slice) and
    labels [...] of global ids. `inplace_backward`: the gradient overwrites the logits (their
    memory is not needed after the loss; the caller must not read them after backward)."""
    return VocabParallelCrossEntropy.apply(logits, labels, tp_group, inplace_backward)
