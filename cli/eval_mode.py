"""--mode eval: score the newest checkpoint of a workdir with its config (config.json plus
the command line's eval.* overrides), as the end of training does (train/trainer.py)."""
from __future__ import annotations

from evaluation import suite
from train.checkpoint import restore_newest
from train.metrics import MetricsWriter
from train.run_spec import resolve
from train.state import abstract_state, build_run
from train.trainer import evaluate_and_report, say_beyond_trained


def evaluate_workdir(config, workdir: str) -> dict:
    """Score the newest checkpoint of workdir; write workdir/eval[/<name>]/ and the scalars
    to its metrics. Returns the perplexity result with "retrieval" added."""
    spec = resolve(config, workdir, mode="eval")
    settings = spec.settings
    run = build_run(settings, level=spec.eval_level, tokenizer=spec.tokenizer,
                    rows_in_order=True)
    state, meta = restore_newest(workdir, run, "--mode eval (train first)")
    suite.check_eval_directory(suite.eval_directory(workdir, settings.eval.name),
                               spec.eval_setup)
    data = suite.prepare(spec.eval_setup, run, run.tokenizer, abstract_state(run)["params"])
    say_beyond_trained(settings, spec.curriculum, spec.eval_level, data)
    writer = MetricsWriter(workdir)
    try:
        outcome = evaluate_and_report(settings.eval.name, run, state, data, int(meta["step"]),
                                      writer, workdir=workdir)
    finally:
        writer.close()
    return dict(outcome["perplexity_by_length"], retrieval=outcome["retrieval"])
