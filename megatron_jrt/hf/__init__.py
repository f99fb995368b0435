"""JRT-RNN as Hugging Face custom code: the config, the model, and the megatron weight mapping.

configuration_jrt.py and modeling_jrt.py import only torch and transformers: they are copied
next to converted weights (jrt-convert to-hf). weights.py maps megatron names onto them.
"""
