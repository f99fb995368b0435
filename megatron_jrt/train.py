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

from megatron_jrt.startup_interrupt import end_of_start_up, exit_on_ctrl_c_during_imports

exit_on_ctrl_c_during_imports("jrt-train", __name__)  # before torch and megatron

import torch  # noqa: E402 - after the start-up SIGINT handler

from megatron_jrt.config import ConfigError
from megatron_jrt.errors import DataError, ExitCode, NonFiniteLossError, exit_code_for
from megatron_jrt.train_config import (TrainConfig, config_to_dict, format_config, load_config,
                                       save_config)


@dataclass
class TrainResult:
    """What a run did, for callers and tests (every rank gets the same losses)."""

    losses: list[float] = field(default_factory=list)  # combined loss per step
    learning_rates: list[float] = field(default_factory=list)  # lr each step used
    step_times: list[float] = field(default_factory=list)  # seconds per step (device synced)
    validation: list[dict[str, float]] = field(default_factory=list)
    nonfinite_steps: int = 0
    skipped_steps: int = 0  # steps whose update the optimizer did not apply
    sample: str | None = None
    start_step: int = 0  # > 0 when resumed from a checkpoint
    last_step: int = 0  # the step the run stopped after
    saved_step: int | None = None  # the step of this run's last checkpoint
    consumed_samples: int = 0  # over the whole run, resumed parts included
    consumed_tokens: int = 0
    stopped_by_signal: str | None = None  # SIGTERM/SIGUSR1/SIGINT: stopped early


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _print(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)


def _forward_step(data_iterator, model, *, global_tokens: torch.Tensor, scale: float):
    """megatron's forward_step contract: the last stage returns this micro-batch's loss share.

    megatron divides the loss by the number of micro-batches and averages gradients over
    data-parallel ranks; `scale` (their product) undoes both, so the gradient is that of the
    objective token-weighted over the global batch (`megatron_jrt.loss.jrt_loss`).
    """
    from megatron_jrt.loss import jrt_loss
    from megatron_jrt.training.engines.base import model_forward

    batch = next(data_iterator)
    output = model_forward(model, batch)

    def loss_func(per_token_loss):
        share, reports = jrt_loss(per_token_loss, batch, global_tokens)
        return share * scale, reports

    return output, loss_func


def _step_forward(batches) -> partial:
    """The forward step of one optimizer step: it needs the global batch's loss token counts."""
    from megatron_jrt.training.engines.base import global_loss_tokens

    counts, scale = global_loss_tokens(batches)
    return partial(_forward_step, global_tokens=counts, scale=scale)


def _load_tokenizer(cfg: TrainConfig):
    from megatron_jrt.data import generated_vocab_size

    if generated_vocab_size(cfg.data) is not None:  # mock tokens or a synthetic task
        return None
    from data_prep.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: empty; give a SentencePiece .model (jrt-prep tokenizer)")
    try:
        return load_tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError, RuntimeError) as error:
        raise DataError(f"data.tokenizer: cannot load {cfg.data.tokenizer} ({error})") from error


def train(cfg: TrainConfig) -> TrainResult:
    """Run the configured training on this process's rank; call after `init_distributed`.

    Everything the run needs is checked before step 0 (`training.preflight`); the save_dir
    lock is held until the run ends, however it ends.
    """
    from megatron_jrt.training.shutdown import ShutdownSignal

    cfg.validate(world_size=torch.distributed.get_world_size())
    # From here on a stop signal waits for a step boundary, also one that comes during start-up.
    shutdown = ShutdownSignal(cfg.training.exit_duration_minutes).install()
    try:
        return _start(cfg, shutdown)
    finally:
        shutdown.restore()


def _start(cfg: TrainConfig, shutdown) -> TrainResult:
    """Start-up checks that need no model, then the run, holding the save_dir lock."""
    from megatron_jrt.distributed import agree
    from megatron_jrt.training.preflight import lock_save_dir, prepare_run_dir

    error, tokenizer = None, None
    try:
        tokenizer = _load_tokenizer(cfg)
    except (ConfigError, DataError) as exc:
        error = exc
    agree(error)
    model_cfg = _built_model_config(cfg, tokenizer)
    _print(format_config(cfg, built=model_cfg))
    prepare_run_dir(Path(cfg.logging.run_dir), partial(save_config, cfg))
    lock, notices = lock_save_dir(cfg.checkpoint.save_dir, cfg.checkpoint.resume)
    for notice in notices:
        _print(f"WARNING: {notice}")
    try:
        return _train(cfg, tokenizer, model_cfg, shutdown)
    finally:
        if lock is not None:
            lock.release()


def _built_model_config(cfg: TrainConfig, tokenizer):
    """The preset and overrides, with the vocabulary the run really has (tokenizer or generated
    data; the latter gets one more id, its mask id)."""
    from megatron_jrt.data import generated_vocab_size

    model_cfg = cfg.model_config()
    vocab = (tokenizer.vocab_size if tokenizer is not None
             else generated_vocab_size(cfg.data) + 1)
    return model_cfg.replace(vocab_size=vocab)


def _train(cfg: TrainConfig, tokenizer, model_cfg, shutdown) -> TrainResult:
    from megatron.core import parallel_state

    from megatron_jrt.checkpoint import resolve_resume
    from megatron_jrt.data import JRTBatches, build_token_source, generated_vocab_size
    from megatron_jrt.distributed import agree
    from megatron_jrt.flops import flops_per_token, peak_flops_per_device
    from megatron_jrt.loss import with_objective
    from megatron_jrt.metrics import MetricsLogger
    from megatron_jrt.model import build_model
    from megatron_jrt.platform import current_device
    from megatron_jrt.runlog import LOSSES_FILE, truncate_losses
    from megatron_jrt.training.engines import build_engine
    from megatron_jrt.training.preflight import open_data
    from megatron_jrt.training.resume import restore_data_position, resume_notice
    from megatron_jrt.megatron_workarounds import start_checkpoint_writer_helper

    world = torch.distributed.get_world_size()
    run_dir = Path(cfg.logging.run_dir)
    mask_id = tokenizer.mask_id if tokenizer is not None else generated_vocab_size(cfg.data)
    # Data first (cheap, and most often wrong): every split the run reads is opened now,
    # not at the first evaluation.
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

    splits = ["train", "valid"] if cfg.training.eval_steps else ["train"]
    open_data(make_batches, splits, eval_steps=cfg.training.eval_steps)
    train_batches = make_batches("train")

    bf16 = cfg.training.bf16 and torch.cuda.is_available()  # CPU runs are fp32
    transformer_config = model_cfg.to_transformer_config(
        tensor_parallel=cfg.parallel.tensor_parallel,
        pipeline_parallel=cfg.parallel.pipeline_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        recompute_granularity=cfg.training.recompute, fusions=cfg.training.fusions_enabled())
    model = build_model(model_cfg, transformer_config)
    if torch.cuda.is_available():
        model.cuda()
    if cfg.training.compile:
        from megatron_jrt.training.compile import compile_model

        _print(f"training.compile: {len(compile_model(model, model_cfg))} modules compiled "
               "(MLPs, full-attention mixers); the first steps compile them")
    # The engine (training.engine) wraps the model with its optimizer and LR schedule.
    num_microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp_world)
    engine = build_engine(cfg, model, transformer_config, bf16=bf16, dp_world=dp_world,
                          num_microbatches=num_microbatches, step_forward=_step_forward)

    # Checkpoint: resume (model, optimizer, scheduler, RNG, data position, counters).
    ckpt = cfg.checkpoint
    config_dict = {"train": config_to_dict(cfg), "model": dataclasses.asdict(model_cfg)}
    resume_path, problems = resolve_resume(ckpt.resume, ckpt.save_dir)
    for problem in problems:
        _print(f"WARNING: {problem}")
    result = TrainResult()
    if resume_path is not None:
        resumed = engine.load(resume_path, expected_model_config=config_dict["model"])
        for warning in resumed.warnings:
            _print(f"WARNING: {warning}")
        _print(f"resumed from {resume_path} at step {resumed.step}")
        notice = resume_notice(resumed, config_dict["train"], engine.learning_rate)
        if notice:
            _print(notice)
        error = None
        try:
            warning = restore_data_position(train_batches.source, resumed, dp_world)
        except ValueError as exc:  # the reader cannot continue with this data config
            error = DataError(f"resuming the training data: {exc}")
        agree(error)
        if warning:
            _print(f"WARNING: {warning}")
        result.start_step = result.saved_step = resumed.step
        result.consumed_samples, result.consumed_tokens = (resumed.consumed_samples,
                                                           resumed.consumed_tokens)
        if ckpt.init_from:
            _print("checkpoint.init_from: not used, the run resumes from its own checkpoint")
    elif ckpt.init_from:
        _init_weights(ckpt, engine.chunks, config_dict["model"])  # megatron only (validate)
    elif ckpt.resume == "auto":
        _print(f"checkpoint.resume=auto: no checkpoint in {ckpt.save_dir}; starting at step 0")

    device = current_device()
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_length
    losses_file = run_dir / LOSSES_FILE if _is_logging_rank() else None
    if losses_file is not None:
        truncate_losses(losses_file, result.start_step)  # steps after it are trained again

    def evaluate(step: int) -> None:
        totals: dict[str, float] = {}
        valid_batches = make_batches("valid")  # the same held-out windows every time
        for eval_index in range(cfg.training.eval_steps):
            batches = valid_batches.step(eval_index * cfg.data.global_batch_size,
                                         num_microbatches, device)
            reduced = engine.eval_step(batches)
            for name, value in with_objective(reduced).items():
                totals[name] = totals.get(name, 0.0) + value / cfg.training.eval_steps
        result.validation.append(totals)
        logger.log_validation(step=step, consumed_samples=result.consumed_samples,
                              losses=totals)

    checkpoints = engine.saver(ckpt.save_dir, config_dict=config_dict,
                               async_save=ckpt.async_save, keep_last=ckpt.keep_last,
                               keep_every=ckpt.keep_every)

    def save(step: int) -> None:
        """Checkpoint `step`, captured now; with async_save it is published at a later step."""
        checkpoints.save(step, data_state=train_batches.source.state_dict(),
                         consumed_samples=result.consumed_samples,
                         consumed_tokens=result.consumed_tokens)
        result.saved_step = step

    logger = MetricsLogger(
        run_dir, enabled=_is_logging_rank(), tensorboard=cfg.logging.tensorboard,
        flops_per_token=flops_per_token(model_cfg, cfg.data.seq_length),
        peak_flops=peak_flops_per_device("bf16" if bf16 else "fp32"), world_size=world,
        progress_total=cfg.training.train_steps, progress_bar=cfg.logging.progress_bar)
    if ckpt.save_dir:
        start_checkpoint_writer_helper()  # before a stop signal can reach it
    try:
        with checkpoints:  # on an error: publish a pending save if every rank failed
            _loop(cfg, result, train_batches, engine, logger, shutdown,
                  num_microbatches=num_microbatches, device=device,
                  tokens_per_step=tokens_per_step, losses_file=losses_file, save=save,
                  checkpoints=checkpoints, evaluate=evaluate)
    finally:
        logger.close()
        engine.close()
    if cfg.training.sample_tokens and tokenizer is not None and not result.stopped_by_signal:
        if engine.name == "megatron":
            result.sample = _sample(cfg, model, model_cfg, tokenizer)
        else:
            _print(f"sample: skipped (not implemented for training.engine={engine.name})")
    return result


def _init_weights(ckpt, chunks, model_config: dict) -> None:
    """checkpoint.init_from: the model weights of a checkpoint; all else starts fresh."""
    from megatron_jrt.checkpoint import load_model_weights, resolve_resume

    path, problems = resolve_resume(ckpt.init_from, ckpt.save_dir, key="checkpoint.init_from")
    for problem in problems:
        _print(f"WARNING: {problem}")
    body = load_model_weights(path, chunks, expected_model_config=model_config, verify=False)
    _print(f"initialised the model from {path} (step {body['step']} of the run that saved it); "
           "optimizer, LR schedule and data start fresh at step 0")


def _loop(cfg: TrainConfig, result: TrainResult, train_batches, engine, logger, shutdown, *,
          num_microbatches: int, device, tokens_per_step: int, losses_file: Path | None, save,
          checkpoints, evaluate) -> None:
    """Steps until training.train_steps or a stop signal; then the final checkpoint."""
    from megatron_jrt.loss import with_objective

    training, save_dir = cfg.training, cfg.checkpoint.save_dir
    consecutive_nonfinite, interval_start, steps_in_interval = 0, time.perf_counter(), 0
    done = result.last_step = result.start_step
    for step in range(result.start_step, training.train_steps):
        step_start = time.perf_counter()
        batches = train_batches.step(result.consumed_samples, num_microbatches, device)
        outcome = engine.train_step(batches)
        losses = with_objective(outcome.losses)
        loss = losses.get("loss", math.nan)  # a host value: the step has finished
        result.step_times.append(time.perf_counter() - step_start)
        result.losses.append(loss)
        result.learning_rates.append(outcome.learning_rate or 0.0)
        result.skipped_steps += int(outcome.skipped)
        done = result.last_step = step + 1
        result.consumed_samples += cfg.data.global_batch_size
        result.consumed_tokens += tokens_per_step
        if math.isfinite(loss):
            consecutive_nonfinite = 0
        else:
            consecutive_nonfinite += 1
            result.nonfinite_steps += 1
            if consecutive_nonfinite >= training.max_consecutive_nonfinite:
                error = NonFiniteLossError(
                    f"step {done}: {consecutive_nonfinite} consecutive steps with a non-finite "
                    "loss (training.max_consecutive_nonfinite); lower optimizer.lr or check the data")
                error.all_ranks = True  # every rank saw the same reduced loss
                raise error
        steps_in_interval += 1
        if losses_file is not None:
            with open(losses_file, "a") as handle:
                handle.write(json.dumps({"step": done, **losses}) + "\n")
        if done % training.log_interval == 0 or done == training.train_steps:
            elapsed = time.perf_counter() - interval_start
            logger.log_train(
                step=done, consumed_samples=result.consumed_samples,
                consumed_tokens=result.consumed_tokens, losses=losses,
                lr=outcome.learning_rate or 0.0, grad_norm=outcome.grad_norm,
                step_time=elapsed / steps_in_interval, tokens_per_step=tokens_per_step,
                skipped_steps=result.skipped_steps, nonfinite_steps=result.nonfinite_steps,
                max_memory_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else None)
            interval_start, steps_in_interval = time.perf_counter(), 0
        checkpoints.poll(done)  # publish a background save once every rank has written it
        if save_dir and done % cfg.checkpoint.save_interval == 0:
            save(done)  # before evaluating: an evaluation that fails loses no training
        if shutdown.requested():
            result.stopped_by_signal = shutdown.received
            _print(f"{shutdown.why}: " + (
                f"checkpointing at step {done} and stopping" if save_dir else
                f"stopping at step {done} WITHOUT a checkpoint (checkpoint.save_dir is empty)"))
            break
        if training.eval_steps and (done % training.eval_interval == 0
                                    or done == training.train_steps):
            evaluate(done)
    if save_dir and done > (result.saved_step or 0):
        save(done)
    checkpoints.finish()  # the run (also a stopped one) ends with its checkpoints published


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


def _accelerators(cfg: TrainConfig) -> str:
    """Which optional accelerators megatron-core will use (apex, Transformer Engine), the Adam
    that will run, and the speed switches (`training.fusions`, `training.compile`)."""
    from importlib.util import find_spec

    from megatron_jrt.training.optim import adam_implementation

    found = [name for name, module in (("apex", "apex"), ("Transformer Engine",
                                                          "transformer_engine"))
             if find_spec(module) is not None]
    fusions = cfg.training.fusions_enabled()
    return ("accelerators: " + (", ".join(found) if found else
                                "none (no apex or Transformer Engine: torch norms)")
            + " | Adam: " + adam_implementation(fused_adam=fusions,
                                                cpu_offload=cfg.optimizer.cpu_offload,
                                                offload_fraction=cfg.optimizer.offload_fraction)
            + f" | fusions {'on' if fusions else 'off'} | compile "
            + ("on" if cfg.training.compile else "off"))


def main(argv: list[str] | None = None) -> int:
    """Run `jrt-train`; the exit code says how it ended (`megatron_jrt.errors.ExitCode`)."""
    from megatron_jrt.distributed import destroy_distributed, init_distributed, read_launch_env
    from megatron_jrt.quiet import silence_megatron_noise
    from megatron_jrt.runlog import ConsoleLog, write_exit

    silence_megatron_noise()
    args = parse_args(argv)
    launch = read_launch_env()
    try:
        cfg = load_config(args.config, args.set)
        cfg.validate(world_size=launch.world_size)
    except (ConfigError, FileNotFoundError) as error:  # every rank reads the same config
        if launch.rank == 0:
            print(f"jrt-train: config error: {error}", file=sys.stderr)
        return ExitCode.CONFIG
    run_dir = Path(cfg.logging.run_dir)
    end_of_start_up()  # from here the command's own SIGINT handling
    with ConsoleLog(run_dir, enabled=launch.rank == 0):
        try:
            init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                             seed=cfg.training.seed)
            _print(_accelerators(cfg))
            code, message = _outcome(train(cfg))
            _print(f"jrt-train: {message}")
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - reported in one line
            code, message = _report_error(error, run_dir, launch.rank)
        finally:
            destroy_distributed()
    if launch.rank == 0:
        write_exit(run_dir, code, message)
    return code


def _outcome(result: TrainResult) -> tuple[ExitCode, str]:
    """How a run that returned ended: trained out, or stopped by a signal (saved or not)."""
    if result.stopped_by_signal is None:
        return ExitCode.OK, f"done at step {result.last_step}"
    if result.saved_step == result.last_step:
        return ExitCode.STOPPED, (f"stopped by {result.stopped_by_signal} after a checkpoint at "
                                  f"step {result.last_step}; resume with "
                                  "--set checkpoint.resume=auto")
    return ExitCode.STOPPED_UNSAVED, (
        f"stopped by {result.stopped_by_signal} at step {result.last_step} without a checkpoint "
        "(checkpoint.save_dir is empty): the steps of this run are lost")


def _report_error(error: BaseException, run_dir: Path, rank: int) -> tuple[ExitCode, str]:
    """One line on the console (rank 0, or the rank that alone hit it), the traceback to a file."""
    from megatron_jrt.runlog import write_traceback

    code = exit_code_for(error)
    message = (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
    if isinstance(error, KeyboardInterrupt):
        message = "aborted by a second Ctrl-C; no checkpoint of the steps since the last save"
    path = write_traceback(run_dir, rank, error)
    if rank == 0 or not getattr(error, "all_ranks", False):
        where = f" on rank {rank}" if rank else ""
        trace = f" (traceback: {path})" if path is not None else ""
        print(f"jrt-train: error{where}: {message}{trace}", file=sys.stderr, flush=True)
    return code, message


if __name__ == "__main__":
    sys.exit(main())
