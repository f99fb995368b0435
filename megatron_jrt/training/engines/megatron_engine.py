"""The megatron-core engine: DDP (distributed optimizer), megatron's Adam and schedules.

`optimizer.cpu_offload` makes that Adam megatron-core's HybridDeviceOptimizer (optimizer state
in host memory; `training.optim`), which needs CUDA: on CPU `build_optimizer` stops the run
at start-up with a ConfigError naming the key.

Delegates to the functions the trainer has always used (`wrap_with_ddp`, `build_optimizer`,
`training.step`, `megatron_jrt.checkpoint`); this class only holds them together behind
the engine seam (`engines.base.Engine`). The objective comes in as megatron's forward_step
(`step_forward(batches)`, the trainer's; contract in `megatron_jrt.training.step`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron.core.utils import get_model_config

from megatron_jrt.batch import JRTBatch
from megatron_jrt.checkpoint import CheckpointSaver, CheckpointState, load_checkpoint
from megatron_jrt.training.optim import build_optimizer
from megatron_jrt.training.parallelize import wrap_with_ddp
from megatron_jrt.training.resume import apply_optimizer_config
from megatron_jrt.training import step as steps  # looked up per call (tests patch them)


class MegatronEngine:
    """megatron-core DDP + optimizer over the model (TP/PP as `init_distributed` set them)."""

    name = "megatron"

    def __init__(self, cfg, model, transformer_config, *, bf16: bool, num_microbatches: int,
                 step_forward: Callable[[list[JRTBatch]], Callable]):
        opt = cfg.optimizer
        self._opt = opt
        self._step_forward = step_forward
        parallel = cfg.parallel
        self.chunks = wrap_with_ddp([model], transformer_config,
                                    use_distributed_optimizer=parallel.use_distributed_optimizer,
                                    overlap_grad_reduce=parallel.overlap_grad_reduce)
        self.optimizer, self.scheduler = build_optimizer(
            self.chunks, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            use_distributed_optimizer=parallel.use_distributed_optimizer, bf16=bf16,
            warmup_steps=opt.warmup_steps, decay_steps=opt.decay_steps or cfg.training.train_steps,
            lr_decay_style=opt.lr_decay_style, fused_adam=cfg.training.fusions_enabled(),
            cpu_offload=opt.cpu_offload, offload_fraction=opt.offload_fraction)
        self._step_kwargs = dict(num_microbatches=num_microbatches,
                                 seq_length=cfg.data.seq_length,
                                 micro_batch_size=cfg.data.micro_batch_size)

    def train_step(self, batches: list[JRTBatch]) -> steps.StepResult:
        return steps.train_step(self._step_forward(batches), iter(batches), self.chunks,
                                self.optimizer, self.scheduler, **self._step_kwargs)

    def eval_step(self, batches: list[JRTBatch]) -> dict[str, float]:
        return steps.eval_step(self._step_forward(batches), iter(batches), self.chunks,
                               **self._step_kwargs)

    def load(self, path: Path, *, expected_model_config: dict) -> CheckpointState:
        resumed = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler,
                                  expected_model_config=expected_model_config, verify=False)
        apply_optimizer_config(self.optimizer, self.scheduler, self._opt)
        return resumed

    def saver(self, save_dir: str, *, config_dict: dict, async_save: bool, keep_last: int,
              keep_every: int) -> CheckpointSaver:
        return CheckpointSaver(save_dir, self.chunks, self.optimizer, self.scheduler,
                               config_dict=config_dict, async_save=async_save,
                               keep_last=keep_last, keep_every=keep_every)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        """Break the reference cycles that pass through C++, which Python's collector cannot
        see: DDP's `grad_accs` hold each parameter's gradient accumulator, whose backward hook
        refers back to the DDP; the optimizer's views of the parameters reach the same
        accumulators, and the model config refers to the optimizer (`grad_scale_func`). Left
        alone, the model, optimizer state and process groups of every finished run stay in
        memory (and their descriptors open) for the life of the process. The model trains no
        further after this (sampling only runs forward)."""
        for chunk in self.chunks:
            getattr(chunk, "grad_accs", []).clear()
        get_model_config(self.chunks[0]).grad_scale_func = None
