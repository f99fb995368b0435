"""`jrt-train`: pretrain JRT-RNN with megatron-core.

    jrt-train --config configs/demo.yaml [--set section.key=value ...]
    torchrun --nproc-per-node 8 -m megatron_jrt.train --config configs/jrt-360m.yaml

Reads top to bottom: config -> distributed -> tokenizer -> model -> DDP + optimizer ->
data -> loop (step, log, evaluate) -> sample. Each concern lives in its own module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from megatron_jrt.config import ConfigError
from megatron_jrt.train_config import (TrainConfig, config_to_dict, format_config, load_config,
                                       save_config)


@dataclass
class TrainResult:
    """What a run did, for callers and tests (every rank gets the same losses)."""

    losses: list[float] = field(default_factory=list)  # combined loss per step
    step_times: list[float] = field(default_factory=list)  # seconds per step (device synced)
    validation: list[dict[str, float]] = field(default_factory=list)
    nonfinite_steps: int = 0
    skipped_steps: int = 0  # steps whose update the optimizer did not apply
    sample: str | None = None
    start_step: int = 0  # > 0 when resumed from a checkpoint
    stopped_by_signal: str | None = None  # SIGTERM/SIGUSR1: checkpointed and stopped early


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss."""


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _print(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _forward_step(data_iterator, model):
    """megatron's forward_step contract: the last stage returns per-token losses."""
    from megatron_jrt.loss import jrt_loss

    batch = next(data_iterator)
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    output = model(batch.input_ids, positions.unsqueeze(0).expand_as(batch.input_ids), None,
                   labels=batch.labels)

    def loss_func(per_token_loss):
        loss, parts = jrt_loss(per_token_loss, batch)
        # Reports are copies: the schedule scales `loss` in place before backward.
        return loss, {"loss": loss.detach().clone(), **parts}

    return output, loss_func


def _load_tokenizer(cfg: TrainConfig):
    if cfg.data.mock_data:
        return None
    from data_prep.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: empty; give a SentencePiece .model (jrt-prep tokenizer)")
    return load_tokenizer(cfg.data.tokenizer)


def train(cfg: TrainConfig) -> TrainResult:
    """Run the configured training on this process's rank; call after `init_distributed`."""
    from megatron.core import parallel_state

    from megatron_jrt.checkpointing import (ShutdownSignal, load_checkpoint, resolve_resume,
                                            save_checkpoint)
    from megatron_jrt.data import JRTBatches, build_token_source
    from megatron_jrt.flops import flops_per_token, peak_flops_per_device
    from megatron_jrt.metrics import MetricsLogger
    from megatron_jrt.model import build_model
    from megatron_jrt.platform import current_device
    from megatron_jrt.training.optim import build_optimizer
    from megatron_jrt.training.parallelize import wrap_with_ddp
    from megatron_jrt.training.step import eval_step, train_step

    world = torch.distributed.get_world_size()
    cfg.validate(world_size=world)
    run_dir = Path(cfg.logging.run_dir)
    _print(format_config(cfg))
    if torch.distributed.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # Model: the vocabulary and [MASK] id come from the tokenizer.
    tokenizer = _load_tokenizer(cfg)
    model_cfg = cfg.model_config()
    if tokenizer is not None:
        model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
        mask_id = tokenizer.mask_id
    else:
        model_cfg = model_cfg.replace(vocab_size=cfg.data.mock_vocab_size + 1)
        mask_id = cfg.data.mock_vocab_size
    bf16 = cfg.training.bf16 and torch.cuda.is_available()  # CPU runs are fp32
    transformer_config = model_cfg.to_transformer_config(
        tensor_parallel=cfg.parallel.tensor_parallel,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        recompute_granularity=cfg.training.recompute)
    model = build_model(model_cfg, transformer_config)
    if torch.cuda.is_available():
        model.cuda()
    chunks = wrap_with_ddp([model], transformer_config,
                           use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                           overlap_grad_reduce=cfg.parallel.overlap_grad_reduce)
    opt = cfg.optimizer
    optimizer, scheduler = build_optimizer(
        chunks, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        bf16=bf16, warmup_steps=opt.warmup_steps,
        decay_steps=opt.decay_steps or cfg.training.train_steps,
        global_batch_size=cfg.data.global_batch_size, lr_decay_style=opt.lr_decay_style)

    # Checkpoint: resume (model, optimizer, scheduler, RNG) before the data is built.
    ckpt = cfg.checkpoint
    model_dict = dataclasses.asdict(model_cfg)
    config_dict = {"train": config_to_dict(cfg), "model": model_dict}
    resume_path = resolve_resume(ckpt.resume, ckpt.save_dir)
    resumed = None
    if resume_path is not None:
        resumed = load_checkpoint(resume_path, chunks, optimizer, scheduler,
                                  expected_model_config=model_dict, verify=False)
        for warning in resumed.warnings:
            _print(f"WARNING: {warning}")
        _print(f"resumed from {resume_path} at step {resumed.step}")
    elif ckpt.resume == "auto":
        _print(f"checkpoint.resume=auto: no checkpoint in {ckpt.save_dir}; starting at step 0")
    start_step = resumed.step if resumed is not None else 0

    # Data: every rank of a data-parallel replica reads the same windows.
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_world = parallel_state.get_data_parallel_world_size()
    tokenizer_hash = tokenizer.hash if tokenizer is not None else None

    def make_batches(split: str) -> JRTBatches:
        source = build_token_source(cfg.data, split, dp_rank=dp_rank, dp_world_size=dp_world,
                                    seed=cfg.training.seed, tokenizer_hash=tokenizer_hash)
        return JRTBatches(source, prefix_length=model_cfg.prefix_length, mask_id=mask_id,
                          seed=cfg.training.seed + (split == "valid"),
                          global_batch_size=cfg.data.global_batch_size, dp_rank=dp_rank,
                          dp_world_size=dp_world)

    train_batches = make_batches("train")
    if resumed is not None:
        _resume_data(train_batches.source, resumed, dp_world)
    num_microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp_world)
    device = current_device()
    step_kwargs = dict(num_microbatches=num_microbatches, seq_length=cfg.data.seq_length,
                       micro_batch_size=cfg.data.micro_batch_size)

    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_length
    logger = MetricsLogger(
        run_dir, enabled=_is_logging_rank(), tensorboard=cfg.logging.tensorboard,
        flops_per_token=flops_per_token(model_cfg, cfg.data.seq_length),
        peak_flops=peak_flops_per_device("bf16" if bf16 else "fp32"), world_size=world,
        progress_total=cfg.training.train_steps, progress_bar=cfg.logging.progress_bar)
    result = TrainResult(start_step=start_step)

    def evaluate(step: int) -> None:
        totals: dict[str, float] = {}
        valid_batches = make_batches("valid")  # the same held-out windows every time
        for eval_index in range(cfg.training.eval_steps):
            data = valid_batches.step(eval_index, num_microbatches, device)
            for name, value in eval_step(_forward_step, iter(data), chunks, **step_kwargs).items():
                totals[name] = totals.get(name, 0.0) + value / cfg.training.eval_steps
        result.validation.append(totals)
        logger.log_validation(step=step, consumed_samples=step * cfg.data.global_batch_size,
                              losses=totals)

    def save(done: int) -> None:
        save_checkpoint(ckpt.save_dir, done, chunks, optimizer, scheduler,
                        config_dict=config_dict, data_state=train_batches.source.state_dict(),
                        consumed_samples=done * cfg.data.global_batch_size,
                        keep_last=ckpt.keep_last, keep_every=ckpt.keep_every)

    losses_file = run_dir / "losses.jsonl" if _is_logging_rank() else None
    shutdown = ShutdownSignal().install()
    consecutive_nonfinite, interval_start, steps_in_interval = 0, time.perf_counter(), 0
    done = saved = start_step
    for step in range(start_step, cfg.training.train_steps):
        step_start = time.perf_counter()
        data = train_batches.step(step, num_microbatches, device)
        outcome = train_step(_forward_step, iter(data), chunks, optimizer, scheduler, **step_kwargs)
        loss = outcome.losses.get("loss", math.nan)  # a host value: the step has finished
        result.step_times.append(time.perf_counter() - step_start)
        result.losses.append(loss)
        result.skipped_steps += int(outcome.skipped)
        if math.isfinite(loss):
            consecutive_nonfinite = 0
        else:
            consecutive_nonfinite += 1
            result.nonfinite_steps += 1
            if consecutive_nonfinite >= cfg.training.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"step {step + 1}: {consecutive_nonfinite} consecutive steps with a non-finite "
                    "loss (training.max_consecutive_nonfinite); lower optimizer.lr or check the data")
        done = step + 1
        steps_in_interval += 1
        if losses_file is not None:
            with open(losses_file, "a") as handle:
                handle.write(json.dumps({"step": done, **outcome.losses}) + "\n")
        if done % cfg.training.log_interval == 0 or done == cfg.training.train_steps:
            elapsed = time.perf_counter() - interval_start
            logger.log_train(
                step=done, consumed_samples=done * cfg.data.global_batch_size,
                consumed_tokens=done * tokens_per_step, losses=outcome.losses,
                lr=outcome.learning_rate or 0.0, grad_norm=outcome.grad_norm,
                step_time=elapsed / steps_in_interval, tokens_per_step=tokens_per_step,
                skipped_steps=result.skipped_steps, nonfinite_steps=result.nonfinite_steps,
                max_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else None)
            interval_start, steps_in_interval = time.perf_counter(), 0
        if cfg.training.eval_steps and (done % cfg.training.eval_interval == 0
                                        or done == cfg.training.train_steps):
            evaluate(done)
        if ckpt.save_dir and done % ckpt.save_interval == 0:
            save(done)
            saved = done
        if shutdown.requested():
            result.stopped_by_signal = shutdown.received
            _print(f"received {shutdown.received}: checkpointing at step {done} and stopping")
            break
    shutdown.restore()
    if ckpt.save_dir and done > saved:
        save(done)

    if cfg.training.sample_tokens and tokenizer is not None:
        result.sample = _sample(cfg, model, model_cfg, tokenizer)
    logger.close()
    return result


def _resume_data(source, resumed, dp_world: int) -> None:
    """Continue the training stream where the checkpoint left it.

    Same data-parallel size: each rank reloads its own reader state (exact). A different
    size cannot map reader states 1:1: mock data derives the position from the consumed
    samples (exact, mock windows are layout-independent); the shard reader restarts at the
    epoch position those samples correspond to, and the sample order changes (warned).
    """
    from megatron_jrt.data import MockTokens

    if resumed.data_state is not None:
        source.load_state_dict(resumed.data_state)
        return
    per_rank = resumed.consumed_samples // dp_world
    if isinstance(source, MockTokens):
        source.load_state_dict({"consumed": per_rank})
        return
    state = source.state_dict()
    batches = per_rank // state["micro_batch_size"]
    epoch, position = divmod(batches, source.batches_per_epoch)
    source.load_state_dict({**state, "epoch": epoch, "position": position})
    _print(f"WARNING: data-parallel size changed ({resumed.layout['dp']} -> {dp_world}): the "
           f"shard reader restarts at epoch {epoch}, batch {position} (from "
           f"{resumed.consumed_samples} consumed samples); the sample order differs from an "
           "unchanged run, and samples near the switch may repeat or be skipped")


def _sample(cfg: TrainConfig, model, model_cfg, tokenizer) -> str | None:
    """A greedy continuation of training.sample_prompt, printed by rank 0."""
    from megatron.core import parallel_state

    from megatron_jrt.generate import greedy_generate

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        _print("sample: skipped (greedy sampling needs the whole model; pipeline_parallel > 1)")
        return None
    prompt = cfg.training.sample_prompt or "The"
    new_ids = greedy_generate(model, tokenizer.encode(prompt),
                              prefix_length=model_cfg.prefix_length,
                              max_new_tokens=cfg.training.sample_tokens,
                              eod_id=tokenizer.eod_id)
    text = tokenizer.decode(new_ids)
    _print(f"sample: {prompt!r} -> {text!r}")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jrt-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML run config (configs/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    return parser.parse_args(argv)


# Warnings from inside megatron-core that a user cannot act on: each missing optional
# accelerator, once per module (`_accelerators()` says it in one line), its probe of non-leaf
# .grad attributes, and torch's renaming of collectives megatron calls.
_MEGATRON_NOISE = (
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (UserWarning, "Apex is not installed"),
    (UserWarning, "full scope is deprecated"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf"),
    (FutureWarning, "`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)`"),
)


def _accelerators() -> str:
    """Which optional accelerators megatron-core will use (apex, Transformer Engine)."""
    from importlib.util import find_spec

    found = [name for name, module in (("apex", "apex"), ("Transformer Engine",
                                                          "transformer_engine"))
             if find_spec(module) is not None]
    return ("accelerators: " + ", ".join(found) if found else
            "accelerators: none (no apex or Transformer Engine: torch AdamW and torch norms)")


def main(argv: list[str] | None = None) -> int:
    import warnings

    from megatron_jrt.distributed import destroy_distributed, init_distributed, read_launch_env

    for category, message in _MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        cfg.validate(world_size=read_launch_env().world_size)
    except (ConfigError, FileNotFoundError) as error:
        print(f"jrt-train: config error: {error}", file=sys.stderr)
        return 2
    init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                     seed=cfg.training.seed)
    _print(_accelerators())
    try:
        result = train(cfg)
        if result.stopped_by_signal:
            _print(f"jrt-train: stopped by {result.stopped_by_signal} after a checkpoint; "
                   "resume with --set checkpoint.resume=auto")
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
