"""--mode eval: score the newest checkpoint of a workdir with its config (config.json plus
the command line's eval.* overrides), as the end of training does (train/trainer.py)."""
from __future__ import annotations


from evaluation import suite
from train.checkpoint import restore_newest
from train.curriculum import eval_level
from train.metrics import MetricsWriter
from train.state import abstract_state, build_run, eval_setup_from
from train.trainer import evaluate_and_report, say_beyond_trained
from train.validate import validate_config


def evaluate_workdir(config, workdir: str) -> dict:
    """Score the newest checkpoint of workdir; write workdir/eval[/<name>]/ and the scalars
    to its metrics. Returns the perplexity result with "retrieval" added."""
    curriculum = validate_config(config)
    run = build_run(config, level=eval_level(config, curriculum), rows_in_order=True)
    state, meta = restore_newest(workdir, run, "--mode eval (train first)")
    setup = eval_setup_from(config)
    suite.check_eval_directory(suite.eval_directory(workdir, config.eval.name), setup)
    data = suite.prepare(setup, run, run.tokenizer, abstract_state(run)["params"])
    say_beyond_trained(config, curriculum, data)
    writer = MetricsWriter(workdir)
    try:
        outcome = evaluate_and_report(config, run, state, data, int(meta["step"]), writer,
                                      workdir=workdir)
    finally:
        writer.close()
    return dict(outcome["perplexity_by_length"], retrieval=outcome["retrieval"])
