"""Process-group and model-parallel start-up for torchrun, Slurm or a single process.

``init_distributed`` is the one call a script makes before building a model; afterwards
ask ``megatron.core.parallel_state`` for ranks and groups. ``destroy_distributed``
undoes it (tests call it between layouts).
"""
from __future__ import annotations

import datetime
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from megatron_jrt.platform import ensure_platform


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


# What a launcher tells a rank (torchrun's variables, then Slurm's task ones; `read_launch_env`
# reads them): a process started without them is a lone rank, whatever launched its parent.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def read_launch_env(environ=None) -> LaunchEnv:
    """Read rank/world/local rank/master from torchrun variables, else Slurm, else defaults."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        master = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:  # same on every task of the job, different between concurrent jobs
            port = 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master or "127.0.0.1",
            master_port=port,
            source="slurm",
        )
    # A lone process (no launcher) rendezvouses with itself: any free port, so that two
    # runs on one machine do not collide on a fixed one.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def free_port() -> int:
    """A TCP port on this host that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: ``scontrol show hostnames`` if present, else parsed.

    The compact syntax is ``prefix[01-04,07]suffix,other[1-2]``; the first host of
    ``gpu[003-005,9],cpu1`` is ``gpu003`` (zero padding kept).
    """
    if not nodelist:
        return ""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                 capture_output=True, text=True, timeout=30, check=True)
            hosts = out.stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """Parser of the compact nodelist syntax (used when scontrol is unavailable)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # first top-level comma ends the first group
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    group = nodelist[:end].strip()
    # Expand bracket ranges left to right, always taking the first choice.
    while "[" in group:
        m = re.search(r"\[([^\]]*)\]", group)
        first = m.group(1).split(",")[0].split("-")[0]
        group = group[: m.start()] + first + group[m.end():]
    return group


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234) -> None:
    """Start torch.distributed and megatron's model-parallel state, then seed every RNG.

    Backend: nccl with CUDA (device = local rank), gloo on CPU (with the CPU
    accommodations of ``megatron_jrt.platform``). Seeds follow Megatron-LM: every
    tensor/data-parallel rank of a pipeline stage gets ``seed + 100 * pp_rank``, so
    ``use_cpu_initialization`` builds identical replicas and TP slices of one weight,
    and megatron's RNG tracker adds the tensor-parallel and expert states.
    """
    launch = read_launch_env()
    model_parallel = tensor_parallel * pipeline_parallel
    if tensor_parallel < 1 or pipeline_parallel < 1 or launch.world_size % model_parallel:
        raise ValueError(
            f"world size {launch.world_size} is not divisible by tensor_parallel "
            f"({tensor_parallel}) x pipeline_parallel ({pipeline_parallel}) = {model_parallel}"
        )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ensure_platform()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("JRT_DIST_TIMEOUT_MIN", 30))),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
    )
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    # On CPU this seeds the CPU generator through the platform's RNG-tracker accommodation.
    model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy_distributed() -> None:
    """Tear down megatron's model-parallel state and the process group (safe to repeat)."""
    import sys

    parallel_state = sys.modules.get("megatron.core.parallel_state")  # None: never set up
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # megatron's RotaryEmbedding memoises forward per module (an lru_cache on the method), which
    # would keep finished models' rotary modules, and through them their process groups, alive.
    rotary = sys.modules.get("megatron.core.models.common.embeddings.rotary_pos_embedding")
    if rotary is not None:
        rotary.RotaryEmbedding.forward.cache_clear()
    # DeepSpeed keeps its clone of the world group (what it reduces over without an mpu) across
    # runs; once the process group is gone, a next run in this process would use the dead one.
    deepspeed_groups = sys.modules.get("deepspeed.utils.groups")
    if deepspeed_groups is not None:
        deepspeed_groups._WORLD_GROUP = None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def agree(error: BaseException | None) -> None:
    """Raise on every rank when any rank failed: its own error, else the first rank's.

    For checks whose outcome may differ between ranks (a file one rank cannot read): without
    agreement the ranks that passed would wait forever in the next collective. The raised
    error gets ``all_ranks = True``, so only rank 0 reports it.
    """
    errors: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else _portable(error))
    failed = error if error is not None else next((e for e in errors if e is not None), None)
    if failed is not None:
        failed.all_ranks = True
        raise failed


def on_rank0(action):
    """`action()` on rank 0, its error raised on every rank (`agree`); the result on rank 0,
    None elsewhere. For work on shared folders that one rank does for all."""
    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - agreed and re-raised on every rank
            error = exc
    agree(error)
    return result


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to reach the other ranks), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")
