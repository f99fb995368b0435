"""The run configuration of `jrt-train`: typed sections, YAML + `--set` overrides, validation.

One `TrainConfig` per run. It is built from defaults (the paper's recipe, JRT_SPEC.md section 4),
then a YAML file, then `--set section.key=value` strings, in that order; every value is
type-checked on the way in, and `validate()` checks the relations between values before any
work starts. Every error is a `ConfigError` whose message starts with the full key
(`data.global_batch_size: ...`) and says what to do.

    cfg = load_config("configs/360m.yaml", ["optimizer.lr=6e-4", "model.overrides.prefix_length=512"])
    cfg.validate(world_size=8)           # again, once the world size is known
    print(format_config(cfg))            # the whole config, one `section.key: value` per line
    save_config(cfg, ckpt_dir / "config.yaml")

What the config does not check: that `data.data_dir` and `data.tokenizer` exist (they may be
empty here; the trainer checks the files when it opens them), and anything about the machine.
`checkpoint.save_dir` empty means "do not save"; `checkpoint.resume` must then be "none".
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from megatron_jrt.config import ConfigError, JRTModelConfig, preset

LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_CHOICES = (None, "full")
ENGINES = ("megatron", "deepspeed")
ZERO_STAGES = (1, 2, 3)
OFFLOAD_CHOICES = ("none", "optimizer", "optimizer+params")


@dataclass
class ModelSection:
    preset: str = "jrt-360m"
    # JRTModelConfig field overrides applied to the preset, e.g. {"prefix_length": 512}.
    overrides: dict = field(default_factory=dict)


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False


@dataclass
class DataSection:
    data_dir: str = ""  # may be empty here; the trainer checks it exists
    tokenizer: str = ""  # may be empty here; the trainer checks it exists
    seq_length: int = 2048
    micro_batch_size: int = 4
    global_batch_size: int = 256
    num_workers: int = 2
    skip_corrupt: bool = False
    # Random tokens instead of shards (Megatron-LM's --mock-data): for smoke tests and for
    # checks that must not depend on how shards are split across ranks.
    mock_data: bool = False
    mock_vocab_size: int = 1000
    # A synthetic recall task instead of shards, e.g. {task: mqar, vocab_size: 8192,
    # kv_pairs: [4, 8, 16]} (megatron_jrt.evals.tasks): the loss counts its answers only, and
    # a JRT model's prefix must be its context region. Empty: off.
    synthetic: dict = field(default_factory=dict)


@dataclass
class OptimizerSection:
    lr: float = 8e-4
    min_lr: float = 8e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    warmup_steps: int = 600
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    decay_steps: int | None = None  # None: training.train_steps
    # megatron engine only: megatron-core's optimizer CPU offload (HybridDeviceOptimizer). The
    # Adam states and fp32 main weights of `offload_fraction` of this rank's distributed-optimizer
    # shard live in host memory and are updated there by torch's fused AdamW; gradients go to
    # the host and updated weights come back each step (overlapped on CUDA streams). Saves GPU
    # memory (up to 12 bytes per parameter) for host bandwidth and CPU time. Needs CUDA,
    # training.bf16 and parallel.use_distributed_optimizer. With training.engine=deepspeed use
    # training.offload instead.
    cpu_offload: bool = False
    offload_fraction: float = 1.0  # in (0, 1]; with cpu_offload only


@dataclass
class TrainingSection:
    train_steps: int = 60000
    seed: int = 1234
    bf16: bool = True
    recompute: str | None = None  # None | "full"
    max_consecutive_nonfinite: int = 10
    eval_interval: int = 1000
    eval_steps: int = 10
    log_interval: int = 10
    sample_prompt: str = ""
    sample_tokens: int = 0
    # Stop after this many minutes of wall time (from the start of train()), as a SIGUSR1
    # would: a checkpoint at the next step boundary, exit 10. 0: no limit.
    exit_duration_minutes: float = 0.0
    # Fused kernels that compute the same update and losses as the plain path: torch's fused
    # AdamW where megatron falls back to torch AdamW, megatron's SwiGLU fusion and, in bf16,
    # kernels/cross_entropy's Triton loss (`JRTModelConfig.to_transformer_config`, JRTModel).
    # null: on when training on CUDA;
    # true: also on CPU (a slower start, the fusions are torch.compile'd there too);
    # false: off everywhere (the plain path, to measure or compare against).
    fusions: bool | None = None
    # torch.compile of every layer's MLP and of full-attention mixers
    # (`megatron_jrt.training.compile`): fused elementwise work; inductor compiles during the
    # first steps (tens of seconds). Off by default until measured on GPU (docs/PERFORMANCE.md).
    compile: bool = False
    # The training engine: megatron (megatron-core DDP and distributed optimizer, TP/PP) or
    # deepspeed (ZeRO, TP = PP = 1, an optional extra; megatron_jrt.training.engines, README).
    engine: str = "megatron"
    # deepspeed only: a DeepSpeed JSON merged into the config generated from this one (a value
    # set differently in both is an error); the ZeRO stage (1 | 2 | 3); what ZeRO offloads to
    # CPU (none | optimizer | optimizer+params, the latter with zero_stage 3).
    deepspeed_config: str = ""
    zero_stage: int = 2
    offload: str = "none"

    def fusions_enabled(self) -> bool:
        """`fusions` with null resolved for this machine."""
        import torch

        return torch.cuda.is_available() if self.fusions is None else self.fusions


@dataclass
class CheckpointSection:
    save_dir: str = ""  # empty: do not save
    save_interval: int = 1000
    resume: str = "none"  # none | auto (latest in save_dir) | path to a checkpoint
    keep_last: int = 3
    keep_every: int = 0  # also keep every Nth step's checkpoint; 0: off
    # Write checkpoints in the background: training stalls only while the state is captured
    # and copied to host memory, and a checkpoint is published (renamed, `latest`) once every
    # rank has written it, so crash safety is that of a synchronous save. On by default, as
    # it is safe wherever a synchronous save is; a save whose host copies would not fit in
    # half of a host's free memory is written synchronously instead, with a warning.
    async_save: bool = True
    # Start from these model weights (a checkpoint or a save_dir: its newest) with a fresh
    # optimizer, schedule and data position (fine-tuning, continued pretraining). Used only
    # when there is nothing to resume: a run that resumes (resume=auto found a checkpoint)
    # continues from its own checkpoint instead.
    init_from: str = ""


@dataclass
class LoggingSection:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def model_config(self) -> JRTModelConfig:
        """The preset with `model.overrides` applied (not validated; `validate()` does that)."""
        fields = _field_types(JRTModelConfig)
        checked = {}
        for key, value in self.model.overrides.items():
            full = f"model.overrides.{key}"
            if key not in fields:
                _unknown(full, key, fields, "JRTModelConfig field (model.overrides takes only those)")
            checked[key] = _check_type(full, value, fields[key])
        return preset(self.model.preset, **checked)

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError (naming the key) for any value the run cannot start with."""
        _validate(self, world_size)


# ---------------------------------------------------------------------------------------------
# Types and loading

_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(full_key: str, name: str, choices, what: str) -> typing.NoReturn:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(choices))}"
    raise ConfigError(f"{full_key}: unknown {what}{hint}")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if tp is dict or typing.get_origin(tp) is dict:
        return "mapping"
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` (int is accepted for float) or raise ConfigError."""
    expected = tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            tp = non_none[0]
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is dict or typing.get_origin(tp) is dict:
        ok = isinstance(value, dict)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(expected)}, got {value!r}")
    return value


def _section_from_mapping(name: str, values: Any) -> Any:
    cls = _SECTIONS[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys to values, got {values!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            _unknown(f"{name}.{key}", str(key), types_, f"key in section {name!r}")
        kwargs[key] = _check_type(f"{name}.{key}", value, types_[key])
    return cls(**kwargs)


def _apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` (or `model.overrides.field=value`) to the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not parts[0] or parts[0] not in _SECTIONS:
        _unknown(parts[0], parts[0], _SECTIONS, "section")
    section = parts[0]
    types_ = _field_types(_SECTIONS[section])
    if len(parts) < 2 or parts[1] not in types_:
        _unknown(dotted, parts[1] if len(parts) > 1 else "", types_, f"key in section {section!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{dotted}: cannot parse {text!r} as a YAML value ({exc})") from None
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {target!r}")
    if section == "model" and parts[1] == "overrides" and len(parts) == 3:
        overrides = dict(target.get("overrides") or {})
        overrides[parts[2]] = value
        target["overrides"] = overrides
        return
    if len(parts) != 2:
        raise ConfigError(f"{dotted}: expected section.key (only model.overrides.<field> nests)")
    # A string field keeps the text as written (`--set data.tokenizer=123` is the name "123").
    tp = types_[parts[1]]
    if tp is str and not isinstance(value, str):
        value = text
    target[parts[1]] = value


def config_from_dict(raw: Any) -> TrainConfig:
    """A TrainConfig from a (possibly partial) nested mapping; type-checks every value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: the top level must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    for name in raw:
        if name not in _SECTIONS:
            _unknown(str(name), str(name), _SECTIONS, "section")
    return TrainConfig(**{name: _section_from_mapping(name, raw.get(name)) for name in _SECTIONS})


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- YAML file (optional, may omit keys) <- `--set` overrides; then `validate()`.

    The world size is not known here; call `cfg.validate(world_size)` again once it is.
    """
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              f"(model, data, ...), got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = config_from_dict(raw)
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out.append((prefix, value))


def format_config(cfg: TrainConfig, built: JRTModelConfig | None = None) -> str:
    """Every key, one `section.key: value` per line, then the model architecture.

    `built` is the model as the trainer builds it (the vocabulary comes from the tokenizer);
    without it, the preset with its overrides.
    """
    lines: list[tuple[str, Any]] = []
    _flatten("", config_to_dict(cfg), lines)
    text = [f"{key}: {_show(value)}" for key, value in lines]
    try:
        model = built or cfg.model_config()
    except ConfigError:
        return "\n".join(text)
    source = ("as built: vocabulary from the tokenizer" if built is not None
              else f"{cfg.model.preset} + overrides")
    text.append(f"# resolved model ({source})")
    text += [f"# model.resolved.{f.name}: {_show(getattr(model, f.name))}"
             for f in dataclasses.fields(model)]
    return "\n".join(text)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML atomically (a temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Validation of relations between values

def _validate(cfg: TrainConfig, world_size: int | None) -> None:
    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: {message}")

    # Re-check types: a TrainConfig can be built or edited in code, not only loaded.
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for name, tp in _field_types(type(obj)).items():
            _check_type(f"{section}.{name}", getattr(obj, name), tp)

    values: list[tuple[str, Any]] = []
    _flatten("", config_to_dict(cfg), values)
    for key, value in values:  # NaN or inf anywhere ends a run in NaNs, or never ends it
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")

    positive = {
        "parallel.tensor_parallel", "parallel.pipeline_parallel", "data.seq_length",
        "training.train_steps",
        "data.micro_batch_size", "data.global_batch_size", "training.max_consecutive_nonfinite",
        "training.eval_interval", "training.log_interval", "checkpoint.save_interval",
        "checkpoint.keep_last", "data.mock_vocab_size",
    }
    non_negative = {
        "data.num_workers", "training.eval_steps", "training.sample_tokens",
        "training.exit_duration_minutes",
        "optimizer.warmup_steps", "checkpoint.keep_every",
    }
    for key in sorted(positive | non_negative):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in positive and value <= 0:
            fail(key, f"must be a positive integer, got {value}")
        if key in non_negative and value < 0:
            fail(key, f"must be >= 0, got {value}")

    opt = cfg.optimizer
    if opt.lr <= 0:
        fail("optimizer.lr", f"must be > 0, got {opt.lr}")
    if opt.min_lr < 0:
        fail("optimizer.min_lr", f"must be >= 0, got {opt.min_lr}")
    if opt.min_lr > opt.lr:
        fail("optimizer.min_lr", f"{opt.min_lr} is larger than optimizer.lr {opt.lr}; "
                                 "set min_lr <= lr")
    for key in ("adam_beta1", "adam_beta2"):
        beta = getattr(opt, key)
        if not 0.0 <= beta < 1.0:
            fail(f"optimizer.{key}", f"must be in [0, 1), got {beta}")
    if opt.adam_eps <= 0:
        fail("optimizer.adam_eps", f"must be > 0, got {opt.adam_eps}")
    if opt.weight_decay < 0:
        fail("optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}")
    if opt.clip_grad < 0:
        fail("optimizer.clip_grad", f"must be >= 0 (0 disables clipping), got {opt.clip_grad}")
    if opt.lr_decay_style not in LR_DECAY_STYLES:
        fail("optimizer.lr_decay_style", f"{opt.lr_decay_style!r} is not one of "
                                         f"{', '.join(LR_DECAY_STYLES)}")
    if not 0.0 < opt.offload_fraction <= 1.0:
        fail("optimizer.offload_fraction", f"must be in (0, 1] (the share of the optimizer "
                                           "state kept in host memory), got "
                                           f"{opt.offload_fraction}")
    if opt.offload_fraction != 1.0 and not opt.cpu_offload:
        fail("optimizer.offload_fraction", f"{opt.offload_fraction} has no effect without "
                                           "optimizer.cpu_offload=true; set cpu_offload or "
                                           "leave offload_fraction at 1.0")
    if opt.decay_steps is not None and opt.decay_steps <= 0:
        fail("optimizer.decay_steps", f"must be positive or null (= training.train_steps), "
                                      f"got {opt.decay_steps}")
    decay = opt.decay_steps if opt.decay_steps is not None else cfg.training.train_steps
    if cfg.training.train_steps > 0 and opt.warmup_steps >= decay:
        fail("optimizer.warmup_steps", f"{opt.warmup_steps} must be shorter than the decay "
                                       f"({decay} steps, optimizer.decay_steps or "
                                       f"training.train_steps); lower it")

    if cfg.training.recompute not in RECOMPUTE_CHOICES:
        fail("training.recompute", f"{cfg.training.recompute!r} is not one of null, 'full'")
    _validate_engine(cfg)

    ckpt = cfg.checkpoint
    if ckpt.resume not in ("none", "auto"):
        if not ckpt.resume or not Path(ckpt.resume).exists():
            fail("checkpoint.resume", f"{ckpt.resume!r} is not 'none', 'auto' or an existing "
                                      "checkpoint path")
    if ckpt.init_from and not Path(ckpt.init_from).exists():
        fail("checkpoint.init_from", f"{ckpt.init_from!r} does not exist; give a checkpoint "
                                     "directory or a save_dir")
    if ckpt.init_from and ckpt.resume not in ("none", "auto"):
        fail("checkpoint.init_from", "is for starting a run; with checkpoint.resume set to a "
                                     "checkpoint it would never be used: set one of the two")
    if ckpt.resume == "auto" and not ckpt.save_dir:
        fail("checkpoint.resume", "'auto' resumes from the latest checkpoint in "
                                  "checkpoint.save_dir, which is empty; set save_dir")
    if not cfg.logging.run_dir:
        fail("logging.run_dir", "must not be empty")

    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    model = cfg.model_config()  # names model.overrides.<key> / model.preset on error
    model.validate(tp, pp)
    data = cfg.data
    if data.seq_length > model.max_sequence_length:
        fail("data.seq_length", f"{data.seq_length} is longer than the model's "
                                f"max_sequence_length {model.max_sequence_length}; lower "
                                "data.seq_length or set model.overrides.max_sequence_length")
    if model.prefix_length >= data.seq_length:
        fail("model.prefix_length", f"{model.prefix_length} leaves no next-token positions in "
                                    f"data.seq_length {data.seq_length} (the NTP loss covers "
                                    "positions prefix_length..seq_length-1); set "
                                    "model.overrides.prefix_length < data.seq_length")
    if data.synthetic:
        _validate_synthetic(data, model.prefix_length)

    if world_size is not None:
        if world_size <= 0 or world_size % (tp * pp):
            fail("parallel.tensor_parallel", f"world size {world_size} is not divisible by "
                                             f"tensor_parallel * pipeline_parallel = {tp * pp}")
        dp = world_size // (tp * pp)
    else:
        dp = 1
    per_step = data.micro_batch_size * dp
    if data.global_batch_size % per_step:
        fail("data.global_batch_size", f"{data.global_batch_size} is not divisible by "
                                       f"data.micro_batch_size * data_parallel = "
                                       f"{data.micro_batch_size} * {dp} = {per_step}; "
                                       "choose a multiple")


def _validate_engine(cfg: TrainConfig) -> None:
    """training.engine and its DeepSpeed settings (the DeepSpeed JSON is read at start-up)."""
    training, parallel = cfg.training, cfg.parallel
    if training.engine not in ENGINES:
        raise ConfigError(f"training.engine: {training.engine!r} is not one of "
                          f"{', '.join(ENGINES)}")
    if training.zero_stage not in ZERO_STAGES:
        raise ConfigError(f"training.zero_stage: {training.zero_stage} is not one of 1, 2, 3")
    if training.offload not in OFFLOAD_CHOICES:
        raise ConfigError(f"training.offload: {training.offload!r} is not one of "
                          f"{', '.join(OFFLOAD_CHOICES)}")
    if cfg.optimizer.cpu_offload:
        if training.engine == "deepspeed":
            raise ConfigError("optimizer.cpu_offload: is megatron-core's optimizer offload (the "
                              "megatron engine); with training.engine=deepspeed set "
                              "training.offload=optimizer (ZeRO's CPU offload) instead")
        if not parallel.use_distributed_optimizer:
            raise ConfigError("optimizer.cpu_offload: megatron-core offloads the distributed "
                              "optimizer's shards; set parallel.use_distributed_optimizer=true")
        if not training.bf16:
            raise ConfigError("optimizer.cpu_offload: megatron-core offloads the fp32 main "
                              "weights of a bf16 model (its precision-aware optimizer); an fp32 "
                              "model has none to move: set training.bf16=true")
    if training.engine != "deepspeed":
        if training.offload != "none":
            raise ConfigError(f"training.offload: {training.offload!r} is DeepSpeed ZeRO's "
                              "offload (training.engine=deepspeed); with the megatron engine "
                              "set optimizer.cpu_offload=true instead")
        return
    if parallel.tensor_parallel != 1 or parallel.pipeline_parallel != 1:
        raise ConfigError(
            f"parallel.tensor_parallel: the deepspeed engine runs TP = PP = 1 (got TP="
            f"{parallel.tensor_parallel}, PP={parallel.pipeline_parallel}); use "
            "training.engine=megatron for tensor or pipeline parallelism")
    if training.offload == "optimizer+params" and training.zero_stage != 3:
        raise ConfigError(f"training.offload: 'optimizer+params' needs training.zero_stage=3 "
                          f"(got {training.zero_stage}); only ZeRO-3 partitions parameters")
    if cfg.checkpoint.init_from:
        raise ConfigError("checkpoint.init_from: not supported with training.engine=deepspeed "
                          "yet; leave it empty")
    if training.compile:
        raise ConfigError("training.compile: not supported with training.engine=deepspeed yet; "
                          "set it to false")


def _validate_synthetic(data: DataSection, prefix_length: int) -> None:
    """data.synthetic: a task that can generate, no other data source, a prefix that fits it."""
    from megatron_jrt.evals.tasks import build_task, check_prefix

    for key in ("data_dir", "tokenizer"):
        if getattr(data, key):
            raise ConfigError(f"data.{key}: {getattr(data, key)!r}, but data.synthetic generates "
                              "its own tokens; leave data.data_dir and data.tokenizer empty")
    if data.mock_data:
        raise ConfigError("data.mock_data: true, but data.synthetic is set too; choose one")
    check_prefix(build_task(data.synthetic, data.seq_length), prefix_length)


__all__ = ["TrainConfig", "ModelSection", "ParallelSection", "DataSection", "OptimizerSection",
           "TrainingSection", "CheckpointSection", "LoggingSection", "ConfigError",
           "load_config", "config_from_dict", "config_to_dict", "format_config", "save_config",
           "LR_DECAY_STYLES", "ENGINES", "ZERO_STAGES", "OFFLOAD_CHOICES"]
