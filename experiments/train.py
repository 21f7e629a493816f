r"""Trains a language model: `python experiments/train.py --config=CONFIG --workdir=DIR`.

  python experiments/train.py --config=experiments/configs/shakespeare_char.py:demo \
      --workdir=/tmp/lmjax/demo --config.train.num_steps=500

Every field of the config can be overridden with `--config.SECTION.FIELD=VALUE`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (optionally FILE:ARG).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs and checkpoints go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
