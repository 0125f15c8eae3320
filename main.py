"""Boundless entry point.

  python main.py --config configs/tiny.py [--config.KEY=VALUE ...] [--workdir DIR]
                 [--mode train|eval|generate|compare]
  python main.py --mode generate --workdir DIR --config.generate.prompt="..." [...]

train (default) resumes from the newest checkpoint in the workdir (default
~/boundless_workdirs/<config name>); eval scores the newest checkpoint and writes
DIR/eval/; generate continues --config.generate.prompt with the newest checkpoint (the
run's config from DIR/config.json unless --config is given); compare (--workdirs A,B,C)
prints their evaluations as one table, and with --workdir also writes it and one plot
there. Multi-host flags: README, "Multi-host".
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# Outside the repository, so that runs never land in a checkout unless asked to.
DEFAULT_WORKDIRS = os.path.expanduser("~/boundless_workdirs")

# configs/base.py is the default only so that --mode generate can take --config.KEY
# overrides without a --config file (it reads the run's config.json); the other modes
# still require --config (checked in main()).
_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _BASE_CONFIG, "Config file (configs/*.py); --mode generate reads the "
    "workdir's config.json when it is not given.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: ~/boundless_workdirs/<config name>; for "
    "--mode compare, where to write compare.md and the plot: nothing is written without it).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate", "compare"],
                          "train, eval (the newest checkpoint of --workdir), generate "
                          "(continue --config.generate.prompt with the newest checkpoint of "
                          "--workdir), or compare (the eval results of --workdirs as one "
                          "table; with --workdir, also written there with a plot).")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "--mode compare: the run directories to compare.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "explicit"],
    "off: one process; auto: jax.distributed.initialize() detects the cluster; explicit: "
    "use the coordinator flags below (chosen automatically when they are given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
                                   "This process's index.")


def start_distributed() -> None:
    """Start jax.distributed when asked to; must run before any other JAX call."""
    import jax
    if _COORDINATOR.value or _DISTRIBUTED.value == "explicit":
        if _COORDINATOR.value is None or _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address, --num_processes and --process_id "
                                 "must be given together")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value == "auto":
        jax.distributed.initialize()


def main(argv):
    del argv
    # Library INFO logs (Orbax, XLA) drown the progress line; keep warnings and our own.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("boundless").setLevel(logging.INFO)
    if _MODE.value == "compare":
        from evaluation import report
        if not _WORKDIRS.value:
            raise app.UsageError("--mode compare needs --workdirs A,B,...")
        try:
            print(report.compare(_WORKDIRS.value, _WORKDIR.value))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if _WORKDIR.value:
            print(f"wrote {_WORKDIR.value}/compare.md and {_WORKDIR.value}/compare_perplexity.png")
        return
    config_given = flags.FLAGS["config"].present
    if _MODE.value == "generate" and not config_given:
        if not _WORKDIR.value:
            raise app.UsageError("--mode generate needs --workdir (the trained run)")
        from train import generate_mode
        try:
            config = generate_mode.workdir_config(
                _WORKDIR.value, config_flags.get_override_values(flags.FLAGS["config"]))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    else:
        config = _CONFIG.value
        if not config_given or config is None:
            raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    start_distributed()
    from train import trainer  # imported after jax.distributed is up
    config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join(DEFAULT_WORKDIRS, config_name)
    try:
        if _MODE.value == "train":
            trainer.train(config, workdir)
        elif _MODE.value == "generate":
            from train import generate_mode
            generate_mode.generate_workdir(config, workdir)
        else:
            trainer.evaluate_workdir(config, workdir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
