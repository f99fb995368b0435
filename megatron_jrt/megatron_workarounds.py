"""Workarounds for megatron-core 0.16.1 behaviour that checkpointing hits (beside platform.py's
CPU ones).

The first two concern the distributed optimizer over plain ``torch.optim.AdamW``, which
megatron-core uses when neither apex nor Transformer Engine is installed; the others its
checkpoint writer's processes: the helper under stop signals, the background writer of an
async save under stop signals and after an error (waited for, or killed). Remove each when
an upgrade of megatron-core fixes it (the resume and signal tests in tests/test_checkpoint*.py,
tests/test_async_checkpoint.py, tests/test_run_control.py and tests/test_slurm.py then
still pass without it).
"""
from __future__ import annotations

import signal
from typing import Callable

import psutil
import torch


def _torch_adam(optimizer) -> torch.optim.Optimizer | None:
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) else None


def init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors, "step" included, before a load.

    megatron's DistributedOptimizer.state_dict() (called while building the loading state
    dict) reads "step" from every parameter's state when neither apex nor TE is installed,
    but its init_state_fn creates only exp_avg / exp_avg_sq. The values are overwritten by
    the load.
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = _torch_adam(wrapper)
        if inner is not None:
            _zero_adam_state(inner, device_steps=False)


def init_offload_adam_state(optimizer) -> None:
    """Give the HybridDeviceOptimizer's torch AdamWs (CPU offload) the state their first step
    would create.

    The same need as `init_torch_adam_state`: megatron's DistributedOptimizer.state_dict(),
    which a checkpoint load calls before loading, reads every parameter's "step" when neither
    apex nor TE is installed, and a fresh HybridDeviceOptimizer has none (megatron's own
    remedy, a step on random gradients, comes later in the load). Step 0 and zero moments are
    what torch's AdamW starts from, so the updates do not change; the memory is what the first
    step allocates anyway.
    """
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    for chained in optimizer.chained_optimizers:
        hybrid = chained.optimizer
        if not isinstance(hybrid, HybridDeviceOptimizer):
            continue
        for sub in hybrid.sub_optimizers:
            if isinstance(sub, (torch.optim.Adam, torch.optim.AdamW)):
                _zero_adam_state(sub, device_steps=True)
        hybrid._sync_sub_optimizers_state_to_hdo()


def _zero_adam_state(adam: torch.optim.Optimizer, device_steps: bool) -> None:
    """Step 0 and zero moments for each parameter of torch Adam `adam` that has no state yet.

    `device_steps`: a fused or capturable group's step count as a float32 tensor beside its
    parameter, as those kernels keep it; otherwise (and always without it) a CPU scalar.
    """
    for group in adam.param_groups:
        on_device = device_steps and (group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = adam.state[param]
            if state:
                continue
            state["step"] = (torch.zeros((), dtype=torch.float32, device=param.device)
                             if on_device else torch.tensor(0.0))
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _own_offloaded_steps(optimizer) -> None:
    """After a load, give each host-side parameter of a HybridDeviceOptimizer (CPU offload) its
    own Adam "step" tensor.

    megatron's load sets one "step" tensor into every parameter's state, and the offload
    optimizer's move of its state to the host (`.to("cpu")`) keeps that one tensor, so torch's
    AdamW, which increments each parameter's count in place, would advance it once per
    parameter per step and skew the bias correction from the first update after a resume
    (seen on an H200: that update 2e-4 off the straight run's). The GPU side gets copies.
    """
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    hybrid = getattr(optimizer, "optimizer", None)
    if not isinstance(hybrid, HybridDeviceOptimizer):
        return
    for inner in hybrid.sub_optimizers:
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # the dict is also the HDO's state entry


def load_optimizer_state(optimizer, state) -> None:
    """optimizer.load_state_dict, around a megatron 0.16 bug with torch Adam (no apex/TE).

    DistributedOptimizer.load_state_dict puts "step" into every parameter's Adam state and
    then, loading the `fully_reshardable` parameter state, copies every state key from the
    checkpoint, which has no "step" (it lives in the param groups): KeyError 'step'. So the
    parameter state is loaded here with the "step" entries set aside.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(subs) == 1 else [state[k] for k in sorted(state)]
    for sub, sub_state in zip(subs, states):
        if not (isinstance(sub, DistributedOptimizer) and _torch_adam(sub) is not None
                and sub_state.get("param_state_sharding_type") == "fully_reshardable"):
            sub.load_state_dict(sub_state)
            _own_offloaded_steps(sub)
            continue
        sub_state = dict(sub_state)
        param_state = sub_state.pop("param_state")
        sub_state.pop("param_state_sharding_type")
        sub.load_state_dict(sub_state)  # param groups and step
        steps = {id(s): s.pop("step") for s in sub.optimizer.state.values() if "step" in s}
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for s in sub.optimizer.state.values():
                if id(s) in steps:
                    # load_state_dict gave all parameters ONE step tensor, and torch Adam
                    # increments it in place per parameter: give each its own.
                    s["step"] = steps[id(s)].clone()
    if len(subs) > 1:
        optimizer._synchronize_steps()


STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def start_checkpoint_writer_helper() -> None:
    """Start megatron's checkpoint-writer helper process now, deaf to stop signals.

    dist_checkpointing's writer keeps a `multiprocessing` Manager (spawned at the first save,
    with default signal handling) for its results queue. Slurm delivers a step's signals
    (`--signal=USR1@N`, `scancel --signal`) to every process of a task, and a terminal's Ctrl-C
    reaches the whole process group: either kills the helper, and the checkpoint the signal
    asked for then fails (BrokenPipeError). A blocked signal mask survives fork and exec, so
    starting the helper with the stop signals blocked keeps it out of the way; this process
    unblocks them at once (one that came meanwhile is delivered then).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        filesystem_async._get_write_results_queue()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def deaf_to_stop_signals(write: Callable, *args) -> None:
    """`write(*args)` with the stop signals blocked: the body of an async save's writer.

    megatron forks the background writer (and it forks one process per file) from the
    trainer, so they inherit its stop-signal handlers, and a signal to every process (Slurm,
    a terminal's Ctrl-C) would make each of them print the trainer's stop notice or, at a
    second Ctrl-C, die in the middle of the checkpoint that the trainer is waiting for to
    publish before it stops. Blocked, the signals stay with the trainer; SIGKILL still works.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    write(*args)


def join_background_writes(queue) -> None:
    """Wait for this rank's writers of `queue`'s (an AsyncCallsQueue) unfinished saves.

    megatron's own wait (`maybe_finalize_async_calls`) is collective and finalises too; after
    an error, a rank must first learn whether the others can join that (CheckpointSaver).
    """
    for call in queue.async_calls:
        process = getattr(call.async_caller, "process", None)
        if process is not None:
            process.join()


def kill_background_writes(queue) -> None:
    """Kill the writer processes of `queue`'s (an AsyncCallsQueue) unfinished saves.

    megatron's `AsyncCallsQueue.close(abort=True)` kills nothing with its default
    (non-persistent) callers, and a caller's own `close(abort=True)` kills only the forked
    writer, not the per-file processes it started. Their checkpoint stays unpublished.
    """
    for call in queue.async_calls:
        process = getattr(call.async_caller, "process", None)
        if process is not None and process.pid is not None:
            try:
                tree = psutil.Process(process.pid)
                doomed = [*tree.children(recursive=True), tree]
            except psutil.NoSuchProcess:
                doomed = []
            for member in doomed:
                try:
                    member.kill()
                except psutil.NoSuchProcess:
                    pass
            process.join()
    queue.async_calls.clear()
