"""quantjax: model compression for JAX/Flax (quantization, pruning, distillation)."""

from setuptools import find_packages, setup

setup(
    name="quantjax",
    version="0.1.0",
    description="Functional quantization, pruning and distillation for JAX/Flax, with an experiment harness.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["quantjax", "quantjax.*", "experiments", "configs"]),
    # The C++ source of the CPU kernel, compiled at install (`make`) or first use.
    package_data={"quantjax.kernels": ["cpu/*.cc"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "ml-collections==1.1.0",
        "numpy>=2.0,<3",
        "ml_dtypes>=0.5",
        "absl-py>=2.1",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "gguf==0.19.0",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "xxhash==4.1.0",  # checkpoint checksums (quantjax.io.atomic)
    ],
    extras_require={
        # llama.cpp as an independent runtime for exported GGUF files (built from
        # source by pip, about 4-6 minutes on 2 cores; pip caches the wheel).
        "llamacpp": ["llama-cpp-python==0.3.36"],
        # transformers' reader of compressed-tensors checkpoints (quantjax.io.hf's client).
        "hf": ["compressed-tensors==0.19.0"],
        "test": [
            "pytest>=8",
            # `make test` runs test files on 2 workers (--dist loadfile): XLA compiles
            # on one thread, so two files overlap their compiles on a 2-core machine.
            "pytest-xdist==3.8.0",
            "hypothesis>=6.100",
            "torch==2.13.0",
            "accelerate>=1.0",
            "llama-cpp-python==0.3.36",
            "compressed-tensors==0.19.0",
        ],
    },
)
