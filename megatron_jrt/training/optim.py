"""Optimizer and learning-rate schedule, both megatron-core's.

``get_megatron_optimizer`` picks the Adam implementation: Transformer Engine's or apex's
fused Adam when installed, else ``torch.optim.AdamW`` (no dependency is required), which it
builds without ``fused``: the multi-tensor (foreach) path, about ten passes over the fp32
weights and states per step. ``fused_adam`` switches that fallback to torch's one-pass fused
kernel. It returns a ``ChainedOptimizer`` (one per parameter class: dense, and expert if any).
Biases and 1-D parameters (norms) get no weight decay (megatron's default).
"""
from __future__ import annotations

import torch
from megatron.core import optimizer as megatron_optimizer
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config


def build_optimizer(
    model_chunks,
    *,
    lr: float,
    min_lr: float,
    weight_decay: float,
    adam_beta1: float,
    adam_beta2: float,
    adam_eps: float,
    clip_grad: float,
    use_distributed_optimizer: bool,
    bf16: bool,
    warmup_steps: int,
    decay_steps: int,
    lr_decay_style: str = "cosine",
    fused_adam: bool = False,
):
    """Adam over DDP-wrapped ``model_chunks`` and its LR schedule -> (optimizer, scheduler).

    ``warmup_steps`` and ``decay_steps`` count optimizer steps, and so does the scheduler:
    ``train_step`` advances it by one per applied update. (Megatron-LM counts samples; steps
    keep the schedule where the config says when the global batch changes on resume.)
    The scheduler's values are the ones given here, also after loading a checkpoint
    (``override_opt_param_scheduler``): the checkpoint contributes only its position.
    ``clip_grad`` <= 0 disables clipping.
    The LR rises linearly from 0 over the warmup (step 0 uses lr 0, as in Megatron-LM),
    then decays to ``min_lr`` at ``decay_steps`` (``lr_decay_style``: "cosine", "linear",
    "constant", "inverse-square-root").
    ``fused_adam``: run torch's fused AdamW kernel where megatron falls back to torch AdamW
    (same update, one kernel per parameter group; TE's and apex's Adam are fused already).
    Also sets the model config's ``grad_scale_func`` (loss scaling for fp16; identity
    otherwise), which megatron's pipeline schedules call on the loss.
    """
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= lr ({lr})")
    if decay_steps <= 0 or not 0 <= warmup_steps < decay_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < decay_steps ({decay_steps})")
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, list(model_chunks))
    if megatron_optimizer.USING_PYTORCH_OPTIMIZER:
        for chained in optimizer.chained_optimizers:
            if chained.optimizer is not None:  # None: no parameters of this class here
                _own_steps(chained.optimizer, fused=fused_adam)
    get_model_config(model_chunks[0]).grad_scale_func = optimizer.scale_loss
    scheduler = lr_schedule(optimizer, lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                            warmup_steps=warmup_steps, decay_steps=decay_steps,
                            lr_decay_style=lr_decay_style)
    return optimizer, scheduler


def lr_schedule(optimizer, *, lr: float, min_lr: float, weight_decay: float, warmup_steps: int,
                decay_steps: int, lr_decay_style: str) -> OptimizerParamScheduler:
    """megatron's OptimizerParamScheduler as every engine uses it: warmup from 0 and decay counted
    in optimizer steps, constant weight decay, the values given here winning over a checkpoint's."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )


def adam_implementation(fused_adam: bool) -> str:
    """The Adam that `build_optimizer(..., fused_adam=fused_adam)` runs, in words (start-up log)."""
    if not megatron_optimizer.USING_PYTORCH_OPTIMIZER:
        source = megatron_optimizer.Adam.__module__.split(".")[0]  # transformer_engine | apex
        return f"{source} FusedAdam"
    return "torch AdamW, fused kernel" if fused_adam else "torch AdamW, foreach (unfused)"


def _own_steps(adam: torch.optim.AdamW, fused: bool) -> None:
    """Give every parameter its own `step` count after each `load_state_dict`, and with `fused`
    switch a torch AdamW that megatron built to the fused kernel, now and after each load.

    megatron's distributed optimizer `load_state_dict` sets `step` to one tensor shared by all
    parameters (a resume from disk replaces it later; an in-memory `state_dict()` round trip
    keeps it). torch's AdamW increments every parameter's count in place, so a shared one
    advances by the number of parameters per step and skews Adam's bias correction. A loaded
    state's parameter groups also bring their own `fused`/`foreach` flags (an unfused run's
    would switch the kernel back off), and the fused kernel wants each count as a float32
    tensor beside its parameter.
    """
    def apply(optimizer: torch.optim.AdamW) -> None:
        if fused:
            for group in (optimizer.defaults, *optimizer.param_groups):
                group["fused"], group["foreach"] = True, False
        for param, state in optimizer.state.items():
            if "step" in state:
                state["step"] = (state["step"].to(device=param.device, dtype=torch.float32,
                                                  copy=True) if fused
                                 else state["step"].clone())

    apply(adam)
    adam.register_load_state_dict_post_hook(apply)
