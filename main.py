"""Boundless entry point.

  python main.py --config configs/tiny.py [--config.KEY=VALUE ...] [--workdir DIR]
                 [--mode train|eval|compare]
  python main.py --mode import --hf_dir DIR --workdir W    (Hugging Face -> workdir)
  python main.py --mode export --workdir W --hf_dir OUT    (workdir -> Hugging Face)

train (default) resumes from the newest checkpoint in the workdir (default
~/boundless_workdirs/<config name>); eval scores the newest checkpoint and writes
DIR/eval/; compare (--workdirs A,B,C) prints their evaluations as one table, and with
--workdir also writes it and one plot there. Multi-host flags: README, "Multi-host".
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

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: ~/boundless_workdirs/<config name>; for "
    "--mode compare, where to write compare.md and the plot: nothing is written without it).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "compare", "import", "export"],
                          "train; eval (the newest checkpoint of --workdir; without --config, "
                          "with the workdir's config.json); compare (the eval results of "
                          "--workdirs as one table; with --workdir, also written there with a "
                          "plot); import (--hf_dir into a new --workdir); export (--workdir's "
                          "newest checkpoint to --hf_dir).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "--mode import: a Hugging Face model directory "
                              "to read; --mode export: the directory to write.")
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
    if _MODE.value in ("import", "export"):
        if not _WORKDIR.value or not _HF_DIR.value:
            raise app.UsageError(f"--mode {_MODE.value} needs --workdir and --hf_dir")
        start_distributed()
        from train import hf_workdir  # imported after jax.distributed is up
        run = hf_workdir.import_workdir if _MODE.value == "import" else hf_workdir.export_workdir
        args = ((_HF_DIR.value, _WORKDIR.value) if _MODE.value == "import"
                else (_WORKDIR.value, _HF_DIR.value))
        _exit_on_error(lambda: print(run(*args), flush=True))
        return
    config = _CONFIG.value
    if config is None and not (_MODE.value == "eval" and _WORKDIR.value):
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py (--mode eval "
                             "--workdir W alone takes W's config.json)")
    start_distributed()
    from train import trainer, workdir_config  # imported after jax.distributed is up
    if config is None:
        workdir = _WORKDIR.value
        config = _exit_on_error(lambda: workdir_config.load(workdir))
    else:
        config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
        workdir = _WORKDIR.value or os.path.join(DEFAULT_WORKDIRS, config_name)
    if _MODE.value == "train":
        _exit_on_error(lambda: trainer.train(config, workdir))
    else:
        _exit_on_error(lambda: trainer.evaluate_workdir(config, workdir))


def _exit_on_error(action):
    """Run `action`; a ValueError or FileNotFoundError becomes one line on stderr, exit 2."""
    try:
        return action()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
