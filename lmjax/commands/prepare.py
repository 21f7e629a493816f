r"""`lmjax prepare`: tokenizes a config's data source once into its token store on disk.

  lmjax prepare --config=gpt2_124m_owt --config.data.train_files='owt/*.txt'
  lmjax prepare --config=shakespeare_char --config.data.prepare_workers=2

Training does the same when the store is missing; a second prepare is a no-op, and an
interrupted one resumes (finished shards are kept). Prints where the store is and its counts.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from lmjax import data
from lmjax.commands import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config NAME[:ARG] (`lmjax configs` lists them) or a config file "
    "PATH[:ARG]; its data and tokenizer sections say what to prepare.", lock_config=True)
_VERIFY = flags.DEFINE_bool("verify", False, "Re-hash every shard against the manifest.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.setup_logging()
    try:
        store = data.open_store(_CONFIG.value)
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from e
    if _VERIFY.value:
        store.verify()
    summary = {name: {k: v for k, v in split.items() if k != "shards"}
               for name, split in store.manifest["splits"].items()}
    print(json.dumps({"store": store.path, "dtype": store.dtype.name,
                      "tokenizer": store.manifest["tokenizer"], "splits": summary}, indent=1))


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)` with shipped config names accepted in --config."""
    common.run(main, sys.argv if argv is None else argv)
