"""Evaluation: validation perplexity by context length.

`perplexity_by_length` scores the held-out split at each requested length and returns
{"lengths": [...], "perplexity": [...], "loss": [...], "target_tokens": [...],
"not_evaluable": {length: reason}}; `write_perplexity_files` writes it as
eval/perplexity_by_length.json and .csv. A model with learned absolute positions cannot
run beyond l_max: those lengths are reported as not evaluable, with the reason.
"""
from __future__ import annotations

import csv
import json
import math
import os

import jax
import numpy as np

from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train import data as data_lib
from train.loss import token_loss_sums


def evaluable(model_config, length: int) -> str | None:
    """None if the model can run at `length`, else the reason it cannot."""
    if model_config.position == "learned" and length > model_config.l_max:
        return (f"learned absolute positions stop at l_max={model_config.l_max}; "
                f"length {length} has no position embedding")
    return None


def load_validation_batches(run, lengths) -> dict[int, list]:
    """Host batches of the validation split for each evaluable length."""
    config = run.config
    batches = {}
    for length in lengths:
        if evaluable(run.model_config, length) is not None:
            continue
        shard_index, shard_count, rows, _ = mesh_lib.data_shard(run.mesh, config.eval.batch_size, length)
        batches[length] = data_lib.make_eval_batches(
            config.data, run.tokenizer, seq_len=length, batch_size=rows,
            max_batches=config.eval.max_batches, shard_index=shard_index,
            shard_count=shard_count)
    return batches


def perplexity_by_length(run, params, eval_batches: dict[int, list],
                         lengths=None) -> dict:
    """Mean next-token loss and perplexity on the validation batches of each length."""
    lengths = sorted(eval_batches) if lengths is None else list(lengths)
    global_rows = run.config.eval.batch_size
    gathered = mesh_lib.compute_shardings(run.state_shardings["params"])
    score = jax.jit(lambda p, b: token_loss_sums(
        run.graphdef, jax.lax.with_sharding_constraint(p, gathered), b))
    result = {"lengths": [], "perplexity": [], "loss": [], "target_tokens": [],
              "unigram_perplexity": [], "not_evaluable": {}}
    for length in sorted(set(lengths) | set(eval_batches)):
        reason = evaluable(run.model_config, length)
        if reason is not None:
            result["not_evaluable"][str(length)] = reason
            continue
        nll_total, count_total = 0.0, 0.0
        _, _, _, row_offset = mesh_lib.data_shard(run.mesh, global_rows, length)
        for host_batch in eval_batches[length]:
            host_batch = layout_lib.apply_layout(host_batch, run.config.mesh.layout,
                                                 run.mesh.shape["seq"])
            batch = mesh_lib.host_batch_to_global(host_batch, run.mesh, global_rows, row_offset)
            nll, count = jax.device_get(score(params, batch))
            nll_total += float(nll)
            count_total += float(count)
        loss = nll_total / max(count_total, 1.0)
        result["lengths"].append(length)
        result["loss"].append(loss)
        result["perplexity"].append(math.exp(loss))
        result["target_tokens"].append(int(count_total))
        result["unigram_perplexity"].append(
            unigram_perplexity_of_targets(eval_batches[length], run.model_config.vocab_size))
    return result


def scalars(result: dict) -> dict[str, float]:
    """Flat scalars for metrics.jsonl / TensorBoard: perplexity_<L>, loss_<L>."""
    out = {}
    for length, ppl, loss in zip(result["lengths"], result["perplexity"], result["loss"]):
        out[f"perplexity_{length}"] = ppl
        out[f"loss_{length}"] = loss
    return out


def format_table(result: dict) -> str:
    lines = ["length | loss   | perplexity | unigram baseline | target tokens",
             "-------|--------|------------|------------------|--------------"]
    for length, loss, ppl, unigram, n in zip(result["lengths"], result["loss"],
                                             result["perplexity"], result["unigram_perplexity"],
                                             result["target_tokens"]):
        lines.append(f"{length:>6} | {loss:.4f} | {ppl:>10.3f} | {unigram:>16.3f} | {n}")
    for length, reason in result.get("not_evaluable", {}).items():
        lines.append(f"{length:>6} | not evaluable: {reason}")
    return "\n".join(lines)


def write_perplexity_files(result: dict, eval_dir: str, is_writer: bool = True) -> None:
    """eval/perplexity_by_length.json and .csv (process 0 only)."""
    if not is_writer:
        return
    os.makedirs(eval_dir, exist_ok=True)
    with open(os.path.join(eval_dir, "perplexity_by_length.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(eval_dir, "perplexity_by_length.csv"), "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["length", "loss", "perplexity", "unigram_perplexity", "target_tokens"])
        for row in zip(result["lengths"], result["loss"], result["perplexity"],
                       result["unigram_perplexity"], result["target_tokens"]):
            table.writerow(row)


def unigram_perplexity_of_targets(batches, vocab_size: int) -> float:
    """Baseline: perplexity of the best context-free model on exactly the scored targets,
    i.e. exp(entropy) of their own unigram distribution (an oracle: it is fitted to the
    very tokens it scores). A model that has learned anything from context is below it.
    Counted over this process's rows."""
    counts = np.zeros(vocab_size, np.float64)
    for batch in batches:
        real = batch["loss_mask"] > 0
        counts += np.bincount(batch["targets"][real], minlength=vocab_size)[:vocab_size]
    if counts.sum() == 0:
        return float("nan")
    probs = counts[counts > 0] / counts.sum()
    return float(math.exp(-np.sum(probs * np.log(probs))))
