"""Run megatron-core without CUDA: every CPU accommodation lives here, and only here.

megatron-core 0.16.1 assumes a CUDA device in a few dozen places. On a machine without
CUDA (our CPU CI and laptops) ``ensure_platform()`` makes those places use the CPU;
on a machine with CUDA it does nothing. It is idempotent and cheap to call again.

What is accommodated, and why (megatron-core 0.16.1 code sites):

1. ``torch.cuda.current_device()`` -> ``torch.device("cpu")``, ``torch.cuda.synchronize``
   / ``empty_cache`` / ``set_device`` -> no-ops, CUDA streams and events -> null objects,
   and ``device="cuda"`` (or a CUDA index) in tensor factories (``torch.zeros``,
   ``torch.empty``, ``torch.tensor``, ...) -> ``"cpu"``. Used by: the pipeline schedules
   (``total_num_tokens = torch.zeros(..., device="cuda")``), p2p receive buffers, DDP
   grad buffers (``param_and_grad_buffer``), the optimizers and grad clipping
   (``found_inf``, ``total_norm_cuda``), rotary embeddings, ``DotProductAttention`` and
   the causal mask, the global memory buffer in ``megatron.core.utils``, the
   tensor-parallel mappings and layers, and ``dist_checkpointing`` save (synchronize,
   current_device) and fully parallel load.
   How: each of those megatron modules gets a ``torch`` proxy as its module-global
   ``torch`` name (``_CpuTorch``): it forwards everything to the real torch except the
   names above. torch itself is not patched, so user code and other libraries see the
   real ``torch.cuda``. The list of modules is ``_CUDA_MODULES``.

2. The CUDA RNG tracker -> the CPU RNG. ``model_parallel_cuda_manual_seed`` and
   ``CudaRNGStatesTracker`` keep per-purpose "cuda" RNG states (data-parallel,
   tensor-parallel, expert) and swap them in and out of the CUDA generator. On CPU
   there is only the CPU default generator, so the tracker swaps the CPU generator's
   state: ``_get_cuda_rng_state``/``_set_cuda_rng_state`` become CPU versions, and the
   tracker class becomes ``_CpuRNGStatesTracker``, whose ``fork`` is the original one
   without its "CPU RNG state changed within GPU RNG context" warning (on CPU that
   change is the point). Dropout under ``fork()`` then draws from the
   tensor-parallel-specific state, as on GPU.

3. Type-string checks and ``.cuda()`` calls inside long megatron functions, which a proxy
   cannot reach: the optimizers accept parameters only if ``param.type()`` is
   ``'torch.cuda.FloatTensor'`` (or Half/BFloat16), grad clipping asserts it, and
   ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings under PP),
   ``tensor_parallel.broadcast_data`` and the fully parallel load's exchange functions
   call ``.cuda()`` / ``init_data("cuda")``. How: ``_rewrite_code`` recompiles just those
   functions from their source with the literal strings replaced (``'torch.cuda.X'`` ->
   ``'torch.X'``, ``.cuda()`` -> ``.cpu()``) and swaps the function's ``__code__``, so
   every reference (including ``from ... import name`` copies) sees the change. Each
   replacement must match, so a megatron upgrade that moves the code fails loudly here
   instead of misbehaving later.

Not accommodated (and not needed on CPU): CUDA graphs, FP8, Transformer Engine, apex
fused kernels, ``overlap_param_gather``, NCCL user buffers, MoE token dispatchers.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import textwrap
import types

import torch

_REAL_TORCH = torch
_applied = False

# megatron modules whose module-global ``torch`` is replaced by the CPU proxy.
_CUDA_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.mlp",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)

_TYPE_STRINGS = [
    ("'torch.cuda.HalfTensor'", "'torch.HalfTensor'"),
    ("'torch.cuda.BFloat16Tensor'", "'torch.BFloat16Tensor'"),
    ("'torch.cuda.FloatTensor'", "'torch.FloatTensor'"),
]
_DOT_CUDA = [(".cuda()", ".cpu()")]

# (module, owner attribute or None for a module-level function, function, replacements)
_REWRITES = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups", _TYPE_STRINGS),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__",
     _TYPE_STRINGS),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__",
     _TYPE_STRINGS),
    ("megatron.core.optimizer.clip_grads", None, "clip_grad_by_total_norm_fp32", _TYPE_STRINGS),
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer", _DOT_CUDA),
    ("megatron.core.tensor_parallel.data", None, "broadcast_data", _DOT_CUDA),
    ("megatron.core.dist_checkpointing.exchange_utils", None, "_get_empty_tensor_for_exchange",
     [('init_data("cuda")', 'init_data("cpu")')]),
    ("megatron.core.dist_checkpointing.exchange_utils", None,
     "exchange_loaded_tensors_gather_rounds", _DOT_CUDA),
    ("megatron.core.dist_checkpointing.exchange_utils", None,
     "exchange_loaded_tensors_broadcast", _DOT_CUDA),
)


def ensure_platform() -> None:
    """Apply the CPU accommodations once, when CUDA is unavailable; no-op on GPU."""
    global _applied
    if _applied or _REAL_TORCH.cuda.is_available():
        return
    proxy = _CpuTorch()
    for name in _CUDA_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is _REAL_TORCH:
            module.torch = proxy
    for module_name, owner_name, func_name, replacements in _REWRITES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        _rewrite_code(owner, func_name, replacements)
    _install_cpu_rng_tracker()
    _applied = True


def current_device() -> _REAL_TORCH.device:
    """The device this rank computes on: its GPU, or the CPU."""
    if _REAL_TORCH.cuda.is_available():
        return _REAL_TORCH.device("cuda", _REAL_TORCH.cuda.current_device())
    return _REAL_TORCH.device("cpu")


# --------------------------------------------------------------------------- 1. the proxy

def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):  # a bare CUDA index
        return "cpu"
    if isinstance(device, str):
        device = _REAL_TORCH.device(device)
    return "cpu" if device.type == "cuda" else device


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    factory.__doc__ = fn.__doc__
    return factory


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "eye", "zeros_like", "ones_like", "empty_like", "full_like", "empty_strided",
)


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # wait_stream, record_event, synchronize, query, ...
        return lambda *args, **kwargs: None


def _noop(*args, **kwargs):
    return None


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as megatron's CUDA-assuming code sites see it on CPU."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _REAL_TORCH.device("cpu")
        self.synchronize = _noop
        self.empty_cache = _noop
        self.set_device = _noop
        self.get_rng_state = lambda device=None: _REAL_TORCH.get_rng_state()
        self.set_rng_state = lambda state, device=None: _REAL_TORCH.set_rng_state(state)
        self.manual_seed = _REAL_TORCH.manual_seed
        self.manual_seed_all = _REAL_TORCH.manual_seed
        self.random = types.SimpleNamespace(
            get_rng_state=self.get_rng_state,
            set_rng_state=self.set_rng_state,
            manual_seed=self.manual_seed,
        )
        self.Stream = _NullStream
        self.Event = _NullStream
        self.stream = lambda stream=None: contextlib.nullcontext()
        self.current_stream = lambda device=None: _NullStream()
        self.default_stream = lambda device=None: _NullStream()
        self.nvtx = types.SimpleNamespace(range_push=_noop, range_pop=_noop, mark=_noop)

    def __getattr__(self, name):
        return getattr(_REAL_TORCH.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` with a CPU ``torch.cuda`` and CPU-defaulting factories; all else is torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(_REAL_TORCH, name)))

    def __getattr__(self, name):
        return getattr(_REAL_TORCH, name)

    def __repr__(self):
        return "<megatron_jrt.platform CPU proxy of torch>"


# --------------------------------------------------------------------- 2. the RNG tracker

def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return _REAL_TORCH.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        _REAL_TORCH.set_rng_state(new_state)

    base = mrandom.CudaRNGStatesTracker
    if getattr(base, "_jrt_cpu", False):
        return

    class _CpuRNGStatesTracker(base):
        """CudaRNGStatesTracker whose named states are CPU generator states."""

        _jrt_cpu = True

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            orig_state = _REAL_TORCH.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            _REAL_TORCH.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = _REAL_TORCH.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                _REAL_TORCH.set_rng_state(orig_state)
                self._current_state_name = orig_name

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker = _CpuRNGStatesTracker


# ------------------------------------------------------------- 3. rewritten code objects

def _rewrite_code(owner, func_name: str, replacements) -> None:
    """Recompile ``owner.func_name`` with string replacements and swap its ``__code__``."""
    func = inspect.unwrap(owner.__dict__[func_name] if isinstance(owner, type)
                          else getattr(owner, func_name))
    if getattr(func, "_jrt_rewritten", False):
        return
    source = textwrap.dedent(inspect.getsource(func))
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"(async\s+)?def\s", line))
    source = "\n".join(lines[start:]) + "\n"  # decorators stay applied to the original
    hits = 0
    for old, new in replacements:
        hits += source.count(old)
        source = source.replace(old, new)
    if hits == 0:
        raise RuntimeError(
            f"megatron_jrt.platform: no CUDA site found in {func.__qualname__}; "
            "megatron-core changed, update megatron_jrt/platform.py"
        )
    private = [n for n in re.findall(r"\.(__\w+)", source) if not n.endswith("__")]
    if isinstance(owner, type) and private:  # would need class-body name mangling
        raise RuntimeError(f"cannot rewrite {func.__qualname__}: it uses private names")
    # Compiling inside a factory with a ``__class__`` argument gives zero-argument
    # ``super()`` the same closure cell the method had in its class body.
    factory_src = "def _jrt_factory(__class__):\n" + textwrap.indent(source, "    ")
    factory_src += f"    return {func.__name__}\n"
    namespace: dict = {}
    exec(compile(factory_src, inspect.getsourcefile(func), "exec"), func.__globals__, namespace)
    new_func = namespace["_jrt_factory"](owner if isinstance(owner, type) else None)
    if new_func.__code__.co_freevars != func.__code__.co_freevars:
        raise RuntimeError(f"cannot rewrite {func.__qualname__}: closure mismatch")
    func.__code__ = new_func.__code__
    func._jrt_rewritten = True
