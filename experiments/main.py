"""Thin launcher: `python -m experiments.main --config=configs/default.py --workdir=runs/default`.

Config fields can be overridden on the command line
(`--config.eval.tokens=4096`); unknown keys are rejected by ml_collections.
A config with `stages` runs the staged chain (`experiments.chain`), any other
the method comparison (`experiments.pipeline`); a non-empty `sweep` runs each
of its override sets into its own sub-directory of the workdir.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import chain
from experiments import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  runner = chain.run if "stages" in config else pipeline.run
  chain.run_sweep(config, _WORKDIR.value, runner)


if __name__ == "__main__":
  app.run(main)
