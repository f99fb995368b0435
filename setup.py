"""megatron-jrt: pretraining stack for JRT-RNN on megatron-core."""
from setuptools import find_packages, setup

# jrt-convert and the Hugging Face model (megatron_jrt/hf/); the range tests/test_hf.py passes on.
HF = ["transformers>=5.0,!=5.3.*,<5.25", "safetensors>=0.4"]

# training.engine: deepspeed (README, DeepSpeed); an sdist that installs without a compiler.
DEEPSPEED = ["deepspeed==0.19.8"]

# The recall experiments' plots (megatron_jrt/evals/experiments/plot.py).
EVALS = ["matplotlib"]

setup(
    name="megatron-jrt",
    version="0.1.0",
    description="Pretraining stack for JRT-RNN (Just read twice) on megatron-core",
    packages=[*find_packages(include=["megatron_jrt*", "kernels*", "data_prep*",
                                      "checkpoints_tools*"]),
              "megatron_jrt.configs"],
    # configs/ stays at the top of the repository and is installed inside the package.
    package_dir={"megatron_jrt.configs": "configs"},
    package_data={"data_prep": ["corpus/*"], "megatron_jrt.configs": ["*.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        # 0.16.1 is the newest release with Python 3.11 wheels (see docs/ for why).
        "megatron-core==0.16.1",
        "torch>=2.6",
        # megatron-core imports triton on its import path and needs psutil to save checkpoints,
        # but declares neither.
        "triton",
        "psutil",
        "numpy",
        "pyyaml",
        "sentencepiece>=0.2",
        "webdataset==1.0.2",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3.5", *HF, *EVALS, *DEEPSPEED],
        "gpt2": ["tokenizers"],
        "hf": HF,
        "evals": EVALS,
        "deepspeed": DEEPSPEED,
    },
    entry_points={
        "console_scripts": [
            "jrt-prep=data_prep.cli:main",
            "jrt-train=megatron_jrt.train:main",
            "jrt-demo=megatron_jrt.demo:main",
            "jrt-ckpt=checkpoints_tools.cli:main",
            "jrt-convert=checkpoints_tools.convert:main",
            "jrt-generate=megatron_jrt.generate_cli:main",
            "jrt-eval=megatron_jrt.evals.cli:main",
        ]
    },
)
