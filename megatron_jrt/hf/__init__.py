"""JRT-RNN as Hugging Face custom code: the config, the model, and the megatron weight mapping.

configuration_jrt.py, modeling_jrt.py and pla_kernels.py import only torch and transformers (the
project's kernels lazily, when present): they are copied next to converted weights (jrt-convert
to-hf). weights.py maps megatron names onto them, authors.py the authors' released checkpoints.
"""
