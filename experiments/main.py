"""Thin launcher: `python -m experiments.main --config=configs/default.py --workdir=runs/default`.

Config fields can be overridden on the command line (`--config.eval.tokens=4096`);
a key the config does not have is refused with the valid keys listed.
Everything else is `experiments.pipeline.run`.
"""

import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # bad input: one clear line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli.check_overrides(sys.argv)
  app.run(main)
