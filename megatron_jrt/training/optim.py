"""Optimizer and learning-rate schedule, both megatron-core's.

``get_megatron_optimizer`` picks the Adam implementation: Transformer Engine's or apex's
fused Adam when installed, else ``torch.optim.AdamW`` (no dependency is required), which it
builds without ``fused``: the multi-tensor (foreach) path, about ten passes over the fp32
weights and states per step. ``fused_adam`` switches that fallback to torch's one-pass fused
kernel. It returns a ``ChainedOptimizer`` (one per parameter class: dense, and expert if any).
Biases and 1-D parameters (norms) get no weight decay (megatron's default).

``cpu_offload`` (``optimizer.cpu_offload``) is megatron-core's optimizer CPU offload: the
distributed optimizer's Adam is a ``HybridDeviceOptimizer`` that keeps the fp32 main weights and
Adam states of ``offload_fraction`` of the shard in pinned host memory and steps them with
torch's fused AdamW on the CPU (the rest on the GPU, also fused). It needs CUDA (it moves
gradients and weights on CUDA streams) and the distributed optimizer.
"""
from __future__ import annotations

import torch
from megatron.core import optimizer as megatron_optimizer
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.utils import get_model_config

from megatron_jrt.megatron_workarounds import init_offload_adam_state
from megatron_jrt.training.multi_tensor import use_foreach_multi_tensor


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
    cpu_offload: bool = False,
    offload_fraction: float = 1.0,
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
    (same update, one kernel per parameter group; TE's and apex's Adam are fused already), and
    torch's foreach kernels for the gradient norm and clipping where megatron falls back to
    its local ones (`training.multi_tensor`: no host sync per parameter).
    ``cpu_offload``: megatron-core's optimizer CPU offload of ``offload_fraction`` of the state
    (module docstring); its sub-optimizers are torch's fused AdamW whatever ``fused_adam`` says.
    It needs bf16, ``use_distributed_optimizer`` (ValueError) and CUDA (a ConfigError naming
    ``optimizer.cpu_offload``; the run config checks the rest, `train_config`).
    Also sets the model config's ``grad_scale_func`` (loss scaling for fp16; identity
    otherwise), which megatron's pipeline schedules call on the loss.
    """
    if not 0.0 <= min_lr <= lr:
        raise ValueError(f"need 0 <= min_lr ({min_lr}) <= lr ({lr})")
    if decay_steps <= 0 or not 0 <= warmup_steps < decay_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < decay_steps ({decay_steps})")
    if cpu_offload:
        check_cpu_offload()  # first: a CPU run is fp32 whatever training.bf16 says
    if cpu_offload and not (bf16 and use_distributed_optimizer and 0.0 < offload_fraction <= 1.0):
        raise ValueError(f"cpu_offload needs bf16, use_distributed_optimizer and "
                         f"0 < offload_fraction ({offload_fraction}) <= 1")
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
        **_offload_settings(cpu_offload, offload_fraction),
    )
    if cpu_offload:
        _precision_aware(config)
    optimizer = get_megatron_optimizer(config, list(model_chunks))
    use_foreach_multi_tensor(fused_adam)
    # Offload: the HybridDeviceOptimizer builds its own fused torch AdamWs (CPU and GPU) and,
    # on a load, gives every parameter its own step count; `_own_steps` would move those
    # counts to the GPU beside the (GPU) shard parameters, away from their CPU copies.
    if megatron_optimizer.USING_PYTORCH_OPTIMIZER and not cpu_offload:
        for chained in optimizer.chained_optimizers:
            if chained.optimizer is not None:  # None: no parameters of this class here
                _own_steps(chained.optimizer, fused=fused_adam)
    if megatron_optimizer.USING_PYTORCH_OPTIMIZER and cpu_offload:
        init_offload_adam_state(optimizer)
    if cpu_offload:
        _allow_offload_classes_in_checkpoints(optimizer)
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


def check_cpu_offload() -> None:
    """megatron-core's optimizer offload needs CUDA: a ConfigError naming the key without it
    (megatron itself would fail with an assertion inside torch.cuda)."""
    from megatron_jrt.config import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("optimizer.cpu_offload: megatron-core's optimizer CPU offload "
                          "(HybridDeviceOptimizer) needs CUDA: it moves gradients and weights "
                          "between GPU and host memory on CUDA streams; on this machine set "
                          "optimizer.cpu_offload=false")


def _offload_settings(cpu_offload: bool, offload_fraction: float) -> dict:
    """OptimizerConfig's offload fields. Overlap: gradients go to the host and weights come back
    on side streams while the CPU Adam runs (the same update). Parameter remainders are a TE
    FusedAdam format; the offloaded state keeps whole fp32 main weights."""
    if not cpu_offload:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=offload_fraction,
                overlap_cpu_optimizer_d2h_h2d=True, store_param_remainders=False)


def _precision_aware(config: OptimizerConfig) -> None:
    """Turn on megatron's precision-aware optimizer path for a bf16 offload, as Megatron-LM
    requires with --optimizer-cpu-offload: the HybridDeviceOptimizer then holds the fp32 main
    weights (on the host) and the distributed optimizer keeps no fp32 copy on the GPU.

    bf16 only (the run config says so at start-up): an fp32 model's main weights are its own
    parameters (the optimizer gets shard views, which torch's optimizers refuse: "can't
    optimize a non-leaf Tensor" on an H200), so there is nothing to move; and megatron 0.16.1
    gives fp32 shards their gradient as `decoupled_grad`, which the HybridDeviceOptimizer
    passes on only to offloaded and bf16 parameters.

    Set after construction: megatron-core 0.16.1's OptimizerConfig.__post_init__ calls
    is_te_min_version() for this flag, which raises TypeError without Transformer Engine
    although the offload path never uses TE. The two flags are what __post_init__ sets for it
    (fp32 main weights, no fp8); the asserts it would make (adam, distributed optimizer) hold.
    """
    assert config.optimizer == "adam" and config.use_distributed_optimizer
    assert config.main_params_dtype == torch.float32 and config.fp8_recipe is None
    config.use_precision_aware_optimizer = True
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True


def _allow_offload_classes_in_checkpoints(optimizer) -> None:
    """Let a resume read back the HybridDeviceOptimizer's parameter groups.

    They carry its sub-optimizer classes (`cpu_optimizer_cls`, `gpu_optimizer_cls`) into the
    checkpoint's common state, which megatron-core loads with torch.load's default
    weights_only=True: without this, every resume of an offloaded run fails with "Unsupported
    global: torch.optim.adamw.AdamW" (seen on an H200). Only those classes are allowed.
    """
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    classes = {cls for chained in optimizer.chained_optimizers
               if isinstance(chained.optimizer, HybridDeviceOptimizer)
               for cls in (chained.optimizer.cpu_optimizer_cls,
                           chained.optimizer.gpu_optimizer_cls) if cls is not None}
    torch.serialization.add_safe_globals(sorted(classes, key=lambda c: c.__qualname__))


def adam_implementation(fused_adam: bool, cpu_offload: bool = False,
                        offload_fraction: float = 1.0) -> str:
    """The Adam that `build_optimizer(..., fused_adam=fused_adam, cpu_offload=...)` runs, in
    words (start-up log)."""
    if cpu_offload:
        return (f"megatron HybridDeviceOptimizer: torch AdamW, fused kernel, "
                f"{offload_fraction:.0%} of the state in host memory")
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
