r"""`lmjax train`: trains a language model as a config says, in a workdir it can resume from.

  lmjax train --config=shakespeare_char:demo --workdir=workdirs/demo --config.train.num_steps=500
  lmjax train --config=my_configs/run.py:ARG --workdir=DIR

Every field of the config can be overridden with `--config.SECTION.FIELD=VALUE`. Re-running the
same command resumes from the newest checkpoint in --workdir. Several hosts: run the same command
on every host with --distributed (TPU pods, SLURM: found from the environment) or with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Exit codes: 0 done or preempted (SIGTERM: saved, re-run to resume); 2 a bad setting or input
file (one line naming the field, before anything is computed); 1 the run could not go on (the
workdir is in use, a non-finite loss, a failed save). LMJAX_TRACEBACK=1 adds the traceback.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import checkpoint, lock, run_config, safety, sharding, train
from lmjax.commands import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config NAME[:ARG] (`lmjax configs` lists them) or a config file "
    "PATH[:ARG].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where logs and checkpoints go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Join a multi-host run (settings from the environment).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    common.setup_logging()
    if _DISTRIBUTED.value or _COORDINATOR.value:
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
    program = "lmjax train"
    try:  # a bad value is a usage error naming the field, before anything is computed
        config = run_config.prepare_config(_CONFIG.value)
        result = train.train_and_evaluate(config, _WORKDIR.value)
    except (ValueError, FileNotFoundError) as e:  # a setting or an input file: exit code 2
        common.fail(program, e, 2)
    except (checkpoint.CheckpointError, lock.WorkdirLockedError,
            safety.NonFiniteLossError) as e:  # the run cannot go on: exit code 1
        common.fail(program, e, 1)
    if result.get("preempted"):
        logging.info("preempted at step %d; re-run the same command to resume", result["step"])


def run(argv: list[str] | None = None) -> None:
    """`app.run(main)` with shipped config names accepted in --config."""
    common.run(main, sys.argv if argv is None else argv)
