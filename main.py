"""Boundless entry point.

  python main.py --config configs/tiny.py [--config.KEY=VALUE ...] [--workdir DIR]
                 [--mode train|eval|compare|plan|prepare]
  python main.py --mode eval --workdir W [--config.KEY=VALUE ...]     (W's config.json)
  python main.py --mode generate --workdir W --config.generate.prompt="..." [...]
  python main.py --mode lm_eval --workdir W --config.lm_eval.tasks=a,b [...]
                                                           (lm-evaluation-harness)
  python main.py --mode import --hf_dir DIR --workdir W    (Hugging Face -> workdir)
  python main.py --mode export --workdir W --hf_dir OUT [--overwrite]
                                                           (workdir -> Hugging Face)

train (default) resumes from the newest checkpoint in the workdir (default
~/boundless_workdirs/<config name>); eval scores the newest checkpoint and writes
DIR/eval/; generate continues a prompt with it; eval and generate without --config take
the run's config from DIR/config.json (with the --config.KEY overrides on top); compare
(--workdirs A,B,C) prints their evaluations as one table, and with --workdir also writes
it and one plot there. Multi-host flags: docs/parallelism.md, "Multi-host".
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from util.errors import error_line, first_line

# Outside the repository, so that runs never land in a checkout unless asked to.
DEFAULT_WORKDIRS = os.path.expanduser("~/boundless_workdirs")
# The modes that can take the run's config from the workdir's config.json.
WORKDIR_CONFIG_MODES = ("eval", "generate", "lm_eval")

def _refuse_repeated_flags(args) -> None:
    """A flag given twice is a mistake (absl would keep the last, ml_collections merge
    some): one ValueError line naming it."""
    seen = set()
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in seen:
            raise ValueError(f"--{name} is given twice; give it once")
        seen.add(name)


def _check_command_line(argv) -> None:
    """Repeated flags and unknown --config.KEYs as one line, exit 2. Runs before the
    --config flag is defined: ml_collections applies the overrides to the default config
    file (configs/base.py) as soon as it is defined, with a traceback for a missing key."""
    from configs import base
    try:
        _refuse_repeated_flags(argv[1:])
        base.check_keys([arg[len("--config."):].split("=", 1)[0] for arg in argv[1:]
                         if arg.startswith("--config.")])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _check_command_line(sys.argv)
    # before a config file (or anything else) imports jax: see util/quiet_imports.py
    from util.quiet_imports import import_jax_quietly
    import_jax_quietly()

# configs/base.py is the default only so that --config.KEY overrides work without a
# --config file in the modes that read the workdir's config.json; train requires --config.
_BASE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "base.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _BASE_CONFIG, "Config file (configs/*.py); --mode eval / generate read the "
    "workdir's config.json when it is not given.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: ~/boundless_workdirs/<config name>; for "
    "--mode compare, where to write compare.md and the plot: nothing is written without it).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "generate", "compare", "plan", "prepare", "import",
                      "export", "lm_eval"],
    "train; eval (the newest checkpoint of --workdir); plan (compile every level's train "
    "step abstractly and report per-device memory: nothing is allocated); prepare (tokenize "
    "the source into --config.data.prepare_dir); generate (continue "
    "--config.generate.prompt with it); compare (the eval results of --workdirs as one "
    "table; with --workdir, also written there with a plot); import (--hf_dir into a new "
    "--workdir); export (--workdir's newest checkpoint to --hf_dir); lm_eval "
    "(lm-evaluation-harness tasks --config.lm_eval.tasks on --workdir's newest checkpoint, "
    "written to W/eval/lm_eval.json).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "--mode import: a Hugging Face model directory "
                              "to read; --mode export: the directory to write.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "--mode export: replace a non-empty --hf_dir that holds an earlier "
    "export and nothing else (the export is written beside it and swapped in, so none of its "
    "old files survive); without it a non-empty --hf_dir is refused.")
_START_OVER = flags.DEFINE_boolean(
    "start_over", False, "--mode train: start at step 0 in a workdir whose checkpoints are all "
    "broken (they stay in broken_checkpoints/; the earlier metrics.jsonl and tensorboard/ are "
    "renamed, not deleted); without it such a workdir is refused.")
_WORKDIRS = flags.DEFINE_list("workdirs", [], "--mode compare: the run directories to compare.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "off", ["off", "auto", "explicit"],
    "off: one process; auto: jax.distributed.initialize() detects the cluster; explicit: "
    "use the coordinator flags below (chosen automatically when they are given).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    "This process's index.")


def _usage_error(message: str):
    """A usage mistake: one line and where the flags are listed, exit 2 (absl's UsageError
    would print the whole usage text, with the message last)."""
    print(f"error: {message} (python main.py --help lists the flags)", file=sys.stderr)
    sys.exit(2)


# The flags each mode reads besides --mode; any other flag given is refused in that mode
# (it would be silently ignored). --config covers its --config.KEY overrides.
_DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")
MODE_FLAGS = {
    "train": ("config", "workdir", "start_over", *_DISTRIBUTED_FLAGS),
    "eval": ("config", "workdir", *_DISTRIBUTED_FLAGS),
    "generate": ("config", "workdir", *_DISTRIBUTED_FLAGS),
    "lm_eval": ("config", "workdir", *_DISTRIBUTED_FLAGS),
    "plan": ("config", "workdir", *_DISTRIBUTED_FLAGS),
    "prepare": ("config",),
    "compare": ("workdirs", "workdir"),
    "import": ("hf_dir", "workdir", *_DISTRIBUTED_FLAGS),
    "export": ("hf_dir", "workdir", "overwrite", *_DISTRIBUTED_FLAGS),
}
_OTHER_FLAGS = ("config", "workdir", "workdirs", "hf_dir", "overwrite", "start_over",
                *_DISTRIBUTED_FLAGS)


def check_mode_flags(mode: str) -> None:
    """Refuse a flag the mode does not read, and an empty --workdir / --hf_dir."""
    for name in _OTHER_FLAGS:
        if name not in MODE_FLAGS[mode] and _given(name):
            _usage_error(f"--mode {mode} does not use --{name}")
    for name in ("workdir", "hf_dir"):
        if flags.FLAGS[name].present and not flags.FLAGS[name].value:
            _usage_error(f"--{name} is empty; give a directory")
    if flags.FLAGS["workdirs"].present and not all(flags.FLAGS["workdirs"].value):
        _usage_error("--workdirs has an empty entry; give A,B,... directories")


def _given(name: str) -> bool:
    """Whether the command line sets flag `name` (for --config: the file or an override)."""
    if name == "config":
        return flags.FLAGS["config"].present or bool(
            config_flags.get_override_values(flags.FLAGS["config"]))
    return bool(flags.FLAGS[name].present)


def start_distributed() -> None:
    """Start jax.distributed when asked to; must run before any other JAX call."""
    import jax
    if _COORDINATOR.value or _DISTRIBUTED.value == "explicit":
        if _COORDINATOR.value is None or _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            _usage_error("--coordinator_address, --num_processes and --process_id must be "
                         "given together")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value == "auto":
        jax.distributed.initialize()


class _OneLineLibraryErrors(logging.Filter):
    """Errors that libraries log from background threads (Orbax's failed asynchronous
    saves) keep their first line, not their traceback: the run stops with its own line
    that names the step and the cause."""

    def filter(self, record):
        library = "site-packages" in (record.pathname or "") or record.name == "asyncio"
        if record.levelno >= logging.ERROR and library:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.msg, record.args = first_line(record.getMessage(), 300), ()
        return True


def _one_line_background_errors() -> None:
    """Exceptions in background threads and unraisable ones (Orbax's and tensorstore's
    after a failed save) print one line each, once per distinct message, not a traceback."""
    import threading
    seen = set()

    def report(kind, error):
        line = f"{kind}: {error_line(error)}"
        if line not in seen:
            seen.add(line)
            print(line, file=sys.stderr, flush=True)

    threading.excepthook = lambda args: report("background thread", args.exc_value)
    sys.unraisablehook = lambda args: report("unraisable", args.exc_value)


def main(argv):
    del argv
    _one_line_background_errors()
    # Library INFO logs (Orbax, XLA) drown the progress line; keep warnings and our own.
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OneLineLibraryErrors())
    logging.getLogger("boundless").setLevel(logging.INFO)
    mode = _MODE.value
    check_mode_flags(mode)
    if mode == "compare":
        from evaluation import report
        if not _WORKDIRS.value:
            _usage_error("--mode compare needs --workdirs A,B,...")
        print(_exit_on_error(lambda: report.compare(_WORKDIRS.value, _WORKDIR.value)))
        if _WORKDIR.value:
            print(f"wrote {_WORKDIR.value}/compare.md and {_WORKDIR.value}/compare_perplexity.png")
        return
    if mode in ("import", "export"):
        if not _WORKDIR.value or not _HF_DIR.value:
            _usage_error(f"--mode {mode} needs --workdir and --hf_dir")
        start_distributed()
        from cli import hf_workdir  # imported after jax.distributed is up
        # what the command would write over is refused before the lock creates W/.lock
        if mode == "import":
            _exit_on_error(lambda: hf_workdir.check_import_paths(_HF_DIR.value, _WORKDIR.value))
        else:
            _exit_on_error(lambda: hf_workdir.check_export_target(
                _WORKDIR.value, _HF_DIR.value, _OVERWRITE.value))
        with _locked(_WORKDIR.value, mode):
            if mode == "import":
                line = _exit_on_error(lambda: hf_workdir.import_workdir(_HF_DIR.value,
                                                                        _WORKDIR.value))
            else:
                line = _exit_on_error(lambda: hf_workdir.export_workdir(
                    _WORKDIR.value, _HF_DIR.value, overwrite=_OVERWRITE.value))
        print(line, flush=True)
        return

    config, workdir = _exit_on_error(lambda: _resolve_config(mode))
    if mode == "prepare":
        from cli import prepare_mode
        _exit_on_error(lambda: prepare_mode.prepare_workdir(config))
        return
    if mode == "plan":
        import jax
        # before any backend starts: compile-only devices need no backend but the CPU's
        if config.plan.target != "cpu":
            jax.config.update("jax_platforms", "cpu")
        elif config.plan.devices > 0:
            jax.config.update("jax_platforms", "cpu")
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                       f"platform_device_count={config.plan.devices}").strip()
        else:
            start_distributed()
        from cli import memory_plan
        _exit_on_error(lambda: memory_plan.plan_workdir(config, workdir))
        print(f"wrote {os.path.join(workdir, memory_plan.PLAN_FILE)}")
        return
    start_distributed()
    from train import trainer  # imported after jax.distributed is up
    if mode == "generate":         # reads the workdir only: no lock
        from cli import generate_mode
        _exit_on_error(lambda: generate_mode.generate_workdir(config, workdir))
        return
    with _locked(workdir, mode):
        if mode == "lm_eval":
            from cli import lm_eval_mode
            _exit_on_error(lambda: lm_eval_mode.lm_eval_workdir(config, workdir))
        elif mode == "train":
            summary = _exit_on_error(lambda: trainer.train(config, workdir, _START_OVER.value))
            if not summary["stopped"]:
                _say_where_results_are(workdir, config.eval.name)
        else:
            from cli import eval_mode
            _exit_on_error(lambda: eval_mode.evaluate_workdir(config, workdir))
            _say_where_results_are(workdir, config.eval.name)


def _say_where_results_are(workdir: str, eval_name: str) -> None:
    """The last line of a run that evaluated: where its files are."""
    import jax
    from evaluation import suite
    eval_dir = suite.eval_directory(workdir, eval_name)
    if jax.process_index() == 0:
        print(f"results: {os.path.join(eval_dir, 'summary.md')} (tables, CSV, JSON and plots "
              f"in {eval_dir}/; training metrics in {os.path.join(workdir, 'metrics.jsonl')})",
              flush=True)


@contextlib.contextmanager
def _locked(workdir: str, mode: str):
    """The workdir's lock (cli/workdir_lock.py) for this command; a second writer
    gets one line naming the holder, exit 2."""
    import jax
    from cli import workdir_lock
    with contextlib.ExitStack() as stack:
        _exit_on_error(lambda: stack.enter_context(workdir_lock.hold(
            workdir, f"main.py --mode {mode}", process_index=jax.process_index())))
        yield


def _resolve_config(mode: str):
    """(config, workdir) of this command: the --config file with its --config.KEY
    overrides, or (eval, generate, and train resuming a workdir) the workdir's config.json
    with the overrides; then checked against the workdir's config.json when there is one
    (configs/workdir_config.py, `check_against_workdir`). One ValueError line for an unknown
    key, a config file that does not load, or an override the workdir contradicts."""
    from configs import base
    from configs import workdir_config
    if flags.FLAGS["config"].present:
        # a preset after a colon goes to get_config (configs/llama.py:llama2_7b)
        path, _, preset = flags.FLAGS["config"].config_filename.partition(":")
        if not os.path.isfile(path):
            raise ValueError(f"--config {path}: no such file")
        try:
            config = _CONFIG.value
            config.keys()
        except Exception as error:   # noqa: BLE001 - the config file's own error, as one line
            raise ValueError(f"--config {path} does not load: {error_line(error, None)}") \
                from None
        config_name = os.path.splitext(os.path.basename(path))[0]
        if preset:
            config_name += "_" + re.sub(r"[^A-Za-z0-9_.-]", "_", preset)
        workdir = _WORKDIR.value or os.path.join(DEFAULT_WORKDIRS, config_name)
    elif _WORKDIR.value and (mode in WORKDIR_CONFIG_MODES or workdir_config.exists(_WORKDIR.value)):
        workdir = _WORKDIR.value
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        config = workdir_config.load(workdir, overrides)
    elif mode in WORKDIR_CONFIG_MODES and not _WORKDIR.value:
        raise ValueError(f"--mode {mode} needs --workdir W, a trained run (or --config with "
                         f"the default workdir of that config)")
    else:
        raise ValueError("--config is required, e.g. --config configs/tiny.py (with --workdir W "
                         "that holds a run, W's config.json is used)")
    base.check(config)                     # every key in its range, before anything exists
    if mode in WORKDIR_CONFIG_MODES:       # train checks once init_from / extend are resolved
        workdir_config.check_against_workdir(config, workdir, mode)
    return config, workdir


def _exit_on_error(action):
    """Run `action`; a ValueError or an OSError (a missing or unwritable file: its message
    names it) becomes one line on stderr, exit 2."""
    try:
        return action()
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag, an unknown --config.KEY or a value of the
    wrong type as one line (exit 2) instead of a usage text or a traceback."""
    _check_command_line(argv)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        message = first_line(str(error), None)
        if "Error whilst parsing config file" in lines[0]:   # the file's error is last
            message = f"{lines[0]} {lines[-1]}"
    except Exception as error:  # noqa: BLE001 - an override ml_collections refuses (type, key)
        message = error_line(error, None)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
