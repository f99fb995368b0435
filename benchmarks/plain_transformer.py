"""A plain PyTorch Transformer++ and its training step: the outside baseline of
benchmarks/train_throughput.py.

What a careful single-GPU PyTorch user would write, with no megatron in the way: pre-norm
RMSNorm, rotary embeddings, SwiGLU MLP, tied input/output embeddings, causal SDPA (FlashAttention
on CUDA in bf16), fp32 weights under bf16 autocast, fused AdamW, gradient clipping, and
`torch.compile` per block and for the head + loss (torchtitan's per-block compile: layers of one
shape share one compiled graph). It takes its size from a `JRTModelConfig` (width, depth, heads,
MLP width 2 x hidden as megatron's gated MLP there, vocabulary, norm epsilon, rotary base), so it
has the same parameters as the stack's `transformer-*` preset of that size.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_jrt.config import JRTModelConfig


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, halves layout (megatron's non-interleaved): [b, h, s, d] by [s, d]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Block(nn.Module):
    """x + attention(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, cfg: JRTModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.gate_value = nn.Linear(d, 2 * 2 * d, bias=False)  # [gate, value], 2d each
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.qkv(self.attention_norm(x)).view(b, s, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # [b, heads, s, head_dim] each
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 under autocast
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, s, d))
        gate, value = self.gate_value(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * value)


class Head(nn.Module):
    """Final norm, the tied output projection and the mean next-token cross entropy."""

    def __init__(self, cfg: JRTModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, x: Tensor, embedding: Tensor, labels: Tensor) -> Tensor:
        logits = F.linear(self.norm(x), embedding)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


class PlainTransformer(nn.Module):
    def __init__(self, cfg: JRTModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.padded_vocab_size(), cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", cfg.rotary_base ** -(torch.arange(half) / half),
                             persistent=False)
        # megatron's init: normal(init_std), output projections scaled by 1/sqrt(2 * layers).
        scaled = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=scaled if name.endswith(("out.weight", "down.weight"))
                                else cfg.init_std)

    def compile_blocks(self) -> None:
        for block in self.blocks:
            block.compile()
        self.head.compile()

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """[b, s] token ids and next-token labels -> mean cross entropy."""
        angles = torch.outer(torch.arange(tokens.shape[1], device=tokens.device,
                                          dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(x, self.embedding.weight, labels)


def measure_plain(cfg: JRTModelConfig, *, seq_length: int, batch: int, micro_batch: int,
                  steps: int, warmup: int, compiled: bool, seed: int = 1234) -> dict:
    """Train `cfg`'s PlainTransformer for `warmup` + `steps` steps of `batch` random sequences
    (as `micro_batch`-sized accumulation steps) -> the timed steps' seconds and the last loss.

    As the stack's runs: bf16 autocast on CUDA (fp32 on CPU), AdamW (lr 3e-4, betas 0.9/0.95,
    weight decay 0.1 on matrices), gradient clipping at 1.0. Timing is device-synchronised.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(seed)
    model = PlainTransformer(cfg).to(device)
    if compiled:
        model.compile_blocks()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                   {"params": vectors, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())
    generator = torch.Generator(device).manual_seed(seed)
    accumulation = batch // micro_batch
    times, loss = [], math.nan
    for _ in range(warmup + steps):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_length + 1), device=device,
                               generator=generator)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        for chunk in tokens.split(micro_batch):
            with autocast:
                micro_loss = model(chunk[:, :-1], chunk[:, 1:]) / accumulation
            micro_loss.backward()
            total += micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = total.item()  # waits for the step
        times.append(time.perf_counter() - start)
    return {"step_times": times[warmup:], "loss": loss}
