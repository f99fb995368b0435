"""Build a JRT-RNN model (one pipeline stage of it) on megatron-core's GPTModel.

GPTModel supplies the vocab-parallel tied embedding and output layer, rotary embeddings for
the sliding-window layers, the final norm and the pipeline plumbing; the layer specs supply
the mixers. Keep all model construction here: a later move to megatron-core's HybridModel
is then a change in one place.
"""
from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from kernels.cross_entropy import vocab_parallel_cross_entropy
from megatron_jrt.config import JRTModelConfig
from megatron_jrt.layer_specs import block_spec


class JRTModel(GPTModel):
    """GPTModel whose checkpoints key each layer on its own, and whose fused loss is ours.

    megatron stacks same-named tensors of all layers into one checkpoint tensor, which
    assumes every layer has the same parameters; JRT-RNN mixes three kinds of layer.
    """

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token loss [b, s] of labels [b, s] and logits [s, b, v_local]. With megatron's
        native cross-entropy fusion on (`cross_entropy_loss_fusion`), kernels/cross_entropy
        instead: it reads the bf16 logits in place of megatron's fp32 copies, and its backward
        writes the gradient over them (nothing reads the logits after the loss)."""
        if not (self.config.cross_entropy_loss_fusion
                and self.config.cross_entropy_fusion_impl == "native"):
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                            self.pg_collection.tp, inplace_backward=True)
        return loss.transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        metadata = dict(metadata or {}, non_homogeneous_layers=True)
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)


def build_model(cfg: JRTModelConfig, transformer_config, *, pre_process: bool | None = None,
                post_process: bool | None = None) -> JRTModel:
    """The stage of `cfg` that this rank holds (the whole model without pipeline parallelism)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    tp = transformer_config.tensor_model_parallel_size
    cfg.validate(tp, transformer_config.pipeline_model_parallel_size)
    return JRTModel(
        config=transformer_config,
        transformer_layer_spec=block_spec(cfg, transformer_config),
        vocab_size=cfg.padded_vocab_size(),
        max_sequence_length=cfg.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rotary_base,
    )


def count_parameters(model) -> int:
    """Parameters of one model instance counted once (the tied output weight is not a copy)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
