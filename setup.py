"""quantjax: model compression for JAX/Flax (quantization, pruning, distillation).

`install_requires` holds the ranges the library is tested on (CI runs the core
tests at the oldest end, `requirements/oldest.txt`, and the whole suite at the
pinned set, `requirements/lock.txt`); everything outside the JAX stack is an
extra (`quantjax/optional.py` names the extra a missing feature needs). The
experiment harness (`experiments/`, `configs/`) is run from a checkout and is
not installed.
"""

from setuptools import find_packages, setup

# Extras: file formats and clients of other ecosystems, installed on request.
EXTRAS = {
    # GGUF files out and in (llama.cpp's format).
    "gguf": ["gguf>=0.19,<0.20"],
    # Tokenizers from GGUF and Hugging Face directories, and the transformers /
    # compressed-tensors clients that load exported directories.
    "hf": ["transformers>=5.0,<6", "tokenizers>=0.21", "safetensors>=0.4",
           "compressed-tensors>=0.19,<0.20"],
    # llama.cpp as the runtime that scores exported GGUF files (built from source by pip).
    "llamacpp": ["llama-cpp-python>=0.3.36,<0.4"],
    # The report's plots.
    "plots": ["matplotlib>=3.8"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})
EXTRAS["test"] = EXTRAS["all"] + [
    "pytest>=8",
    # `make test` runs test files on 2 workers (--dist loadfile): XLA compiles on one
    # thread, so two files overlap their compiles on a 2-core machine.
    "pytest-xdist>=3.5",
    # A test that hangs fails with every thread's stack (make test's --timeout) instead
    # of running into CI's time limit with nothing printed.
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    # The parity oracle (transformers on PyTorch); the CPU build of this pin lies on
    # the project's machines, any other release pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "accelerate>=1.0",
    # User-written models of other JAX frameworks in the capture tests.
    "equinox>=0.11",
    "keras>=3.0",
]

_VERSION: dict = {}
with open("quantjax/version.py", encoding="utf-8") as f:
  exec(f.read(), _VERSION)  # the one place the version is written

setup(
    name="quantjax",
    version=_VERSION["__version__"],
    description="Functional quantization, pruning and distillation for JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["quantjax", "quantjax.*"]),
    # The C++ source of the CPU kernel, compiled at install (`make`) or first use.
    package_data={"quantjax.kernels": ["cpu/*.cc"]},
    install_requires=[
        "jax>=0.9.2,<0.11",
        "jaxlib>=0.9.2,<0.11",
        "flax>=0.12.1,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.11.25,<0.13",
        "numpy>=1.26,<3",
        "ml_dtypes>=0.5",
        "ml-collections>=0.1.1",
        "absl-py>=1.4",
        # Small, pure-Python or tiny wheels with no dependencies of their own: progress
        # bars on long work, checksums of checkpoints (quantjax.io.atomic).
        "tqdm>=4.60",
        "xxhash>=3.0",
    ],
    extras_require=EXTRAS,
)
