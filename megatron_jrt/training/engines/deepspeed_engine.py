"""The DeepSpeed engine: ZeRO 1/2/3 (optionally offloaded to CPU) over the same JRT model.

What stays the megatron engine's, so that both follow the same loss curve: the model
(megatron's GPTModel built at TP = PP = 1), the objective token-weighted over the global
batch (`engines.base.global_loss_tokens`), AdamW with megatron's parameter groups (no weight
decay on biases and 1-D parameters) and megatron's LR schedule (`OptimizerParamScheduler`,
counted in optimizer steps), the gradient clipping value. DeepSpeed owns the data-parallel
gradient reduction, the ZeRO partitioning of optimizer state, gradients and parameters, and
its checkpoint files (`engines.deepspeed_checkpoint`).

DeepSpeed is an optional extra (`pip install -e ".[deepspeed]"`); it is imported only here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_jrt.batch import JRTBatch
from megatron_jrt.checkpoint.state import CheckpointState
from megatron_jrt.distributed import read_launch_env
from megatron_jrt.loss import jrt_loss
from megatron_jrt.training.engines.base import global_loss_tokens, model_forward
from megatron_jrt.training.engines.deepspeed_config import deepspeed_config
from megatron_jrt.training.optim import lr_schedule
from megatron_jrt.training.step import StepResult, _all_ranks_finite, reduce_losses


def import_deepspeed():
    """deepspeed, or a ConfigError that says how to install it."""
    from megatron_jrt.config import ConfigError

    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError("training.engine: 'deepspeed' needs the deepspeed package; install "
                          f"it with pip install -e \".[deepspeed]\" ({exc})") from None
    # DeepSpeed reads LOCAL_RANK, which neither a lone `jrt-train` nor srun sets; the process
    # group is already up (`init_distributed`), from the launch environment it read.
    os.environ.setdefault("LOCAL_RANK", str(read_launch_env().local_rank))
    # On CPU DeepSpeed JIT-builds a shared-memory allreduce op with a C++ compiler at its
    # first init (minutes, and a compiler on every node); gloo's allreduce does the same job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next step can be dropped.

    DeepSpeed has no call that discards an accumulated step in fp32/bf16 (its overflow skip is
    fp16's); the trainer's rule, no update on a non-finite loss on any rank, needs one. ZeRO
    calls this optimizer's `step` on its partitions; skipping it leaves weights and Adam
    state unchanged, and DeepSpeed then zeroes the gradients as after any step.
    """

    skip_next: bool = False

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


def megatron_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """megatron's groups: weight decay on matrices; none on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    return [{"params": params, "wd_mult": mult, "weight_decay": weight_decay * mult}
            for params, mult in ((decay, 1.0), (no_decay, 0.0)) if params]


class DeepSpeedEngine:
    """`deepspeed.initialize` over the model with a client AdamW (`engines.base.Engine`)."""

    name = "deepspeed"

    def __init__(self, cfg, model: torch.nn.Module, *, bf16: bool, dp_world: int):
        deepspeed = import_deepspeed()
        opt = cfg.optimizer
        self._opt = opt
        self.zero_stage = cfg.training.zero_stage
        self.config = deepspeed_config(cfg, dp_world=dp_world, bf16=bf16)
        self.optimizer = SkippableAdamW(megatron_param_groups(model, opt.weight_decay),
                                        lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2),
                                        eps=opt.adam_eps, weight_decay=opt.weight_decay)
        self.scheduler = lr_schedule(
            self.optimizer, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            warmup_steps=opt.warmup_steps, decay_steps=opt.decay_steps or cfg.training.train_steps,
            lr_decay_style=opt.lr_decay_style)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                               config=self.config, dist_init_required=False)

    def train_step(self, batches: list[JRTBatch]) -> StepResult:
        counts, scale = global_loss_tokens(batches)
        reports = []
        for index, batch in enumerate(batches):
            per_token = model_forward(self.engine, batch)
            share, report = jrt_loss(per_token, batch, counts)
            self.engine.backward(share * scale)  # DeepSpeed divides by the micro-batches
            reports.append(report)
            if index < len(batches) - 1:
                self.engine.step()  # not a boundary: only counts the micro-batch
        losses = reduce_losses(reports)
        learning_rate = self.learning_rate
        finite = _all_ranks_finite(losses)
        self.optimizer.skip_next = not finite
        try:
            self.engine.step()  # the boundary: reduce, clip, update (or skip), zero grads
        finally:
            self.optimizer.skip_next = False
        if not finite:
            return StepResult(losses, None, True, None, learning_rate)
        self.scheduler.step(increment=1)
        norm = self.engine.get_global_grad_norm()
        return StepResult(losses=losses, grad_norm=None if norm is None else float(norm),
                          skipped=False, num_zeros=None, learning_rate=learning_rate)

    def eval_step(self, batches: list[JRTBatch]) -> dict[str, float]:
        self.engine.eval()
        try:
            with torch.no_grad():
                reports = [jrt_loss(model_forward(self.engine, batch), batch)[1]
                           for batch in batches]
        finally:
            self.engine.train()
        return reduce_losses(reports)

    def load(self, path: Path, *, expected_model_config: dict) -> CheckpointState:
        from megatron_jrt.training.engines.deepspeed_checkpoint import load_deepspeed_checkpoint
        from megatron_jrt.training.resume import apply_optimizer_config

        resumed = load_deepspeed_checkpoint(path, self, expected_model_config)
        apply_optimizer_config(self.optimizer, self.scheduler, self._opt)
        return resumed

    def saver(self, save_dir: str, *, config_dict: dict, async_save: bool, keep_last: int,
              keep_every: int):
        from megatron_jrt.training.engines.deepspeed_checkpoint import DeepSpeedSaver

        return DeepSpeedSaver(save_dir, self, config_dict=config_dict, keep_last=keep_last,
                              keep_every=keep_every)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        """engine.destroy() before the process group goes: without it some multi-rank CPU
        runs abort at exit (ECOSYSTEM_NOTES.md)."""
        self.engine.destroy()
