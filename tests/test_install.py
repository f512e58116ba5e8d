"""quantjax installs as a library: a light core, extras named when missing, no harness
packages in site-packages, and (in the oldest-stack environment) the project's own JAX
stack left as it was."""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

from quantjax import optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "llama_cpp",
         "matplotlib", "compressed_tensors", "ml_collections")


def test_import_pulls_in_no_optional_dependency():
  code = ("import sys, quantjax, quantjax.methods, quantjax.sparsity, quantjax.io.gguf, "
          "quantjax.io.hf, quantjax.models.load, quantjax.eval.report, quantjax.eval.llamacpp; "
          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout


def test_the_harness_is_not_installed_as_top_level_packages(tmp_path):
  subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                 cwd=ROOT, check=True, capture_output=True)
  (info,) = tmp_path.glob("*.egg-info")
  assert (info / "top_level.txt").read_text().split() == ["quantjax"]
  sources = (info / "SOURCES.txt").read_text().split()
  assert not [s for s in sources if s.startswith(("experiments/", "configs/"))]
  # The core requirements hold no package of the torch world; those are extras.
  requires = (info / "requires.txt").read_text().split("\n\n")[0]
  for name in ("torch", "transformers", "gguf", "llama", "matplotlib", "safetensors"):
    assert name not in requires, requires


@pytest.mark.parametrize("module,extra", [("gguf", "gguf"), ("llama_cpp", "llamacpp"),
                                          ("matplotlib.pyplot", "plots"),
                                          ("transformers", "hf")])
def test_a_missing_extra_is_named(monkeypatch, module, extra):
  for name in {module.split(".")[0], module}:  # the import fails as if they were absent
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ImportError, match=rf"pip install 'quantjax\[{extra}\]'"):
    optional.require(module, extra, "this test")


def test_features_name_their_extra(monkeypatch, tmp_path):
  from quantjax.eval import llamacpp, report
  from quantjax.io import gguf_read
  monkeypatch.setitem(sys.modules, "llama_cpp", None)
  monkeypatch.setitem(sys.modules, "gguf", None)
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
  model = tmp_path / "m.gguf"
  model.write_bytes(b"GGUF" + bytes(60))
  with pytest.raises(ImportError, match=r"llama\.cpp evaluation needs the package "
                                        r"'llama-cpp-python'.*quantjax\[llamacpp\]"):
    with llamacpp.open_model(model):
      pass
  with pytest.raises(ImportError, match=r"quantjax\[gguf\]"):
    gguf_read.read_gguf(model)
  with pytest.raises(ImportError, match=r"quantjax\[plots\]"):
    report.pareto_plot([{"params_bytes": 1e6, "perplexity": 10.0}], tmp_path / "p.png")


@pytest.mark.skipif(not os.environ.get("QUANTJAX_EXPECT_OLDEST"),
                    reason="only in the oldest-stack environment (make test-oldest)")
def test_install_kept_the_oldest_stack():
  pins = {}
  for line in (ROOT / os.environ["QUANTJAX_EXPECT_OLDEST"]).read_text().splitlines():
    line = line.split("#")[0].strip()
    if "==" in line:
      name, version = line.split("==")
      pins[name.strip().lower()] = version.strip()
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    assert importlib.metadata.version(name) == pins[name], name
