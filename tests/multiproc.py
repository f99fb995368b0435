"""Run a test function on N ranks, as torchrun would, and bring back what each returned.

    results = launch(check_fn, 2, arg1, arg2)   # [rank0_value, rank1_value]

``check_fn(*args)`` must be a module-level function (it is pickled into spawned
processes). Each worker gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT on a free port of its own) and OMP_NUM_THREADS=1; the function
calls ``megatron_jrt.distributed.init_distributed`` itself. Whatever happens, the
worker destroys megatron's model-parallel state and the process group. A worker's
exception fails the test with that worker's traceback; a hung collective is ended by
``timeout``. ``in_process=True`` (one rank only) runs the function in the pytest
process, which saves a megatron import (4-6 s).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import time
import traceback
from contextlib import contextmanager

import pytest

from megatron_jrt.distributed import free_port


def _rank_env(rank: int, world_size: int, port: int) -> dict:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }


@contextmanager
def _environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cleanup() -> None:
    from megatron_jrt.distributed import destroy_distributed

    destroy_distributed()


def _worker(fn, args, rank, world_size, port, results) -> None:
    os.setpgid(0, 0)  # a process group per rank: launch ends the rank with everything it started
    os.environ.update(_rank_env(rank, world_size, port))
    try:
        import torch

        torch.set_num_threads(1)
        value = fn(*args)
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the traceback goes to the test report
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            _cleanup()
        except Exception:  # noqa: BLE001
            pass


FAILURE_GRACE_S = 5.0  # after one rank fails, how long the others get to report before all are killed


def _kill_ranks(procs, groups_of_exited: bool) -> set[int]:
    """SIGKILL every rank still running and everything it started (each rank leads its own process
    group), then reap them: no rank outlives launch, even one that ignores SIGTERM or hangs in C.
    Returns the ranks that were killed. ``groups_of_exited``: also the helpers of ranks already gone."""
    killed = set()
    for rank, p in enumerate(procs):
        alive = p.is_alive()
        if not alive and not groups_of_exited:
            continue
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no such group: all gone, or not its own yet
            if alive:
                p.kill()
        if alive:
            killed.add(rank)
    for p in procs:
        p.join(timeout=10)
    return killed


def launch(fn, world_size: int, *args, timeout: float = 300, in_process: bool = False) -> list:
    """Run ``fn(*args)`` on ``world_size`` ranks; return the per-rank results in rank order."""
    port = free_port()
    if in_process:
        assert world_size == 1, "in_process runs a single rank"
        with _environ(_rank_env(0, 1, port)):
            try:
                return [fn(*args)]
            finally:
                _cleanup()

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = []
    # Children inherit the environment at spawn: one OpenMP thread per rank from the start.
    with _environ({"OMP_NUM_THREADS": "1"}):
        for rank in range(world_size):
            # Not daemonic: dist_checkpointing.save starts a helper process of its own.
            p = ctx.Process(target=_worker, args=(fn, args, rank, world_size, port, results),
                            name=f"rank{rank}", daemon=False)
            p.start()
            procs.append(p)

    values, errors, failed_at = {}, {}, None
    deadline = time.monotonic() + timeout
    try:
        while len(values) + len(errors) < world_size:
            silent = [r for r, p in enumerate(procs)  # exited without a result (os._exit, a crash)
                      if p.exitcode not in (None, 0) and r not in values and r not in errors]
            if (errors or silent) and failed_at is None:
                failed_at = time.monotonic()  # peers may hang in a collective: a moment to report
            if failed_at is not None and time.monotonic() > failed_at + FAILURE_GRACE_S:
                break
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
    finally:
        done = len(values) == world_size
        if done:  # every rank returned: they exit on their own
            for p in procs:
                p.join(timeout=10)
        killed = _kill_ranks(procs, groups_of_exited=not done)

    missing = [r for r in range(world_size) if r not in values and r not in errors]
    if errors or missing:
        failed, report = sorted(errors), [f"--- rank {r} raised ---\n{tb}" for r, tb in sorted(errors.items())]
        for r in missing:
            if r not in killed:
                why = f"exited with code {procs[r].exitcode} without a result"
            elif failed_at is None:
                why = f"timed out after {timeout:g} s; killed"
            else:
                why = "still running after another rank failed; killed"
            if r not in killed or failed_at is None:
                failed.append(r)
            report.append(f"--- rank {r} returned nothing: {why} ---")
        head = (f"launch: rank {', '.join(map(str, sorted(failed)))} of {world_size} failed"
                f" (every rank and its child processes are ended)")
        pytest.fail("\n".join([head, *report]), pytrace=False)
    return [values[r] for r in range(world_size)]


# ------------------------------------------------------------------------------------
# A tiny megatron-core GPTModel (local spec, fp32, CPU init) shared by the CPU tests.

VOCAB = 64
SEQ = 16


def tiny_gpt(num_layers: int = 2, tie: bool = True):
    """megatron's own GPTModel, small, on the current parallel layout (after init_distributed)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tie,
        position_embedding_type="rope",
    )


def token_batches(n: int, batch: int, seed: int = 0):
    """n (tokens, labels) pairs of shape [batch, SEQ], the same on every rank."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def gpt_forward_step(data_iterator, model):
    """megatron's forward_step contract for the tiny GPT (see megatron_jrt.training.step)."""
    import torch

    tokens, labels = next(data_iterator)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    position_ids = positions.unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)  # [b, s] per-token loss

    def loss_func(per_token_loss):
        loss = per_token_loss.float().sum()
        num_tokens = torch.tensor(per_token_loss.numel(), dtype=torch.int,
                                  device=per_token_loss.device)
        report = torch.cat([loss.detach().view(1), num_tokens.view(1).float()])
        return loss, num_tokens, {"lm loss": report}

    return output, loss_func
