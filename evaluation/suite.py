"""The evaluation suite of a run: build its batches once, score a checkpoint, write
eval[/<name>]/ (perplexity_by_length.json/.csv, retrieval.json, PNGs, summary.md).

What it reads of the run's config comes as an EvalSetup of typed sections
(configs/sections.py; train/ builds it); the model comes placed on a mesh
(parallel/model_on_mesh.py: ModelOnMesh).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from data import retrieval_tasks
from data.windows import (batches_of, document_lengths, same_target_windows, sliding_windows,
                          validation_documents)
from util import json_values
from evaluation import lengths as lengths_lib
from evaluation import perplexity, report
from evaluation import retrieval as retrieval_lib
from evaluation import ruler as ruler_lib
from util.progress import Progress
from evaluation.scoring import Scorer, memory_fits
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from parallel.model_on_mesh import ModelOnMesh, decoding_config

DEPTHS = tuple(i / 10 for i in range(11))   # 0%, 10%, ..., 100%


@dataclasses.dataclass(frozen=True)
class EvalSetup:
    """What evaluation reads of a run's config, as typed pieces (eval_setup builds it)."""
    settings: Any            # the typed `eval` section (configs/sections.py)
    data: Any                # the typed `data` section of the corpus scored (evaluation_data)
    l_max: int               # curriculum.l_max: default lengths start at l_max / 2
    seed: int                # the run's seed: the retrieval grid's samples
    eos_ids: tuple = ()      # generate.eos_ids: RULER's generations end at the first


def eval_setup(settings, data, *, l_max: int, seed: int, eos_ids=()) -> EvalSetup:
    """The EvalSetup of typed `eval` and `data` sections (the corpus resolved by
    evaluation_data)."""
    return EvalSetup(settings, evaluation_data(settings, data), int(l_max), int(seed),
                     tuple(int(i) for i in eos_ids or ()))


@dataclasses.dataclass
class EvalData:
    """Host-side batches (global rows), built once and reused at every evaluation."""
    lengths: list[int]                       # evaluable lengths
    not_evaluable: dict[str, str]
    windows: dict[int, list[dict]]           # same-target batches per length
    sliding: dict[int, list[dict]]           # sliding-window batches per length
    retrieval: dict[str, tuple[list, dict[int, list[dict]]]]  # task: (samples, batches per length)
    retrieval_not_evaluable: dict[str, str]
    ruler: dict | None = None                # build_ruler's samples and settings, or None
    setup: EvalSetup | None = None           # the settings the batches were built from
    tokenizer: Any = None                    # decodes RULER's generations

    def batch_count(self) -> int:
        """Batches `evaluate` scores (the loss-by-position pass rescoring the longest
        windows included)."""
        count = sum(len(b) for b in self.windows.values())
        if self.sliding:
            count += sum(len(b) for b in self.sliding.values())
            count += len(self.windows[max(self.lengths)])
        return count + sum(len(b) for _, by_length in self.retrieval.values()
                           for b in by_length.values())


def build_eval_data(setup: EvalSetup, model_config, tokenizer, *,
                    top_length: int | None = None, documents=None) -> EvalData:
    """The evaluation batches of `setup`. top_length: the probed longest default length
    (lengths.evaluation_lengths); documents: validation_documents, if already read."""
    e = setup.settings
    lengths = lengths_lib.evaluation_lengths(e.lengths, setup.l_max, top_length)
    not_evaluable = {str(L): r for L in lengths if (r := lengths_lib.evaluable(model_config, L))}
    lengths = [L for L in lengths if str(L) not in not_evaluable]
    if documents is None:
        documents = validation_documents(setup.data, tokenizer)
    windows, sliding = {}, {}
    if lengths:
        score_tokens = e.score_tokens or min(lengths)
        rows = same_target_windows(documents, lengths, score_tokens, e.max_batches * e.batch_size)
        windows = {L: batches_of(r, e.batch_size) for L, r in rows.items()}
        if e.sliding_stride:
            for L in lengths:
                r = sliding_windows(documents, L, min(e.sliding_stride, L), e.sliding_max_windows)
                sliding[L] = batches_of(r, e.batch_size)
    retrieval, retrieval_not_evaluable = {}, {}
    if e.retrieval_tasks:
        r_lengths = sorted(e.retrieval_lengths or lengths)
        retrieval_not_evaluable = {str(L): r for L in r_lengths
                                   if (r := lengths_lib.evaluable(model_config, L))}
        r_lengths = [L for L in r_lengths if str(L) not in retrieval_not_evaluable]
        for task in e.retrieval_tasks:
            samples = retrieval_tasks.make_grid(task, tokenizer, lengths=r_lengths,
                                                depths=DEPTHS, seed=setup.seed,
                                                samples_per_cell=e.retrieval_samples)
            by_length = {L: batches_of(retrieval_lib.teacher_forced_batch(
                [s for s in samples if s.length == L], L), e.batch_size) for L in r_lengths}
            retrieval[task] = (samples, by_length)
    return EvalData(lengths, not_evaluable, windows, sliding, retrieval, retrieval_not_evaluable,
                    build_ruler(e.ruler, model_config, tokenizer, lengths, documents),
                    setup, tokenizer)


def build_ruler(r, model_config, tokenizer, lengths, documents) -> dict | None:
    """RULER samples for `r`, the typed eval.ruler section (None when r.tasks is empty):
    the essay haystack is the validation documents' text; lengths the model cannot evaluate
    and (task, length) cells the task cannot fit are recorded in "skipped"."""
    if not r.tasks:
        return None
    qa_path = r.qa_path or None
    tasks, skipped = ruler_lib.resolve_tasks(tuple(r.tasks), qa_path)
    r_lengths = sorted(int(L) for L in (r.lengths or lengths))
    for L in r_lengths:
        if reason := lengths_lib.evaluable(model_config, L):
            skipped[f"@{L}"] = reason
    usable = [L for L in r_lengths if f"@{L}" not in skipped]
    haystack, chars = [], 0
    need = 8 * max(usable, default=0) + 1
    for document in documents:               # enough text for the longest length
        text = tokenizer.decode(np.asarray(document))
        haystack.append(text)
        chars += len(text)
        if chars >= need:
            break
    samples, too_short = ruler_lib.make_samples(
        tasks, usable, int(r.samples), seed=int(r.seed),
        count_tokens=lambda text: len(tokenizer.encode(text)),
        haystack="\n".join(haystack), qa_path=qa_path)
    for key, reason in too_short.items():
        skipped[key] = reason
    tasks = [t for t in tasks if t not in too_short]
    for sample in samples:
        sample["prompt_ids"] = np.asarray(tokenizer.encode(sample["prompt"]), np.int32)
    return {"tasks": tasks, "lengths": r_lengths, "samples": samples, "skipped": skipped,
            "threshold": float(r.threshold),
            "settings": {"tasks": list(r.tasks), "lengths": r_lengths,
                         "samples": int(r.samples), "seed": int(r.seed),
                         "qa_path": r.qa_path}}


def prepare(setup: EvalSetup, placed: ModelOnMesh, tokenizer, abstract_params) -> EvalData:
    """build_eval_data for the model `placed` on the eval mesh. With eval.lengths unset,
    the longest default length is probed against the memory of that mesh (compiling the
    scoring step at doubling lengths with `abstract_params`) and printed with why it
    stopped."""
    documents = validation_documents(setup.data, tokenizer)
    top = None
    e = setup.settings
    if not e.lengths:
        budget, source = lengths_lib.memory_budget_bytes(list(placed.mesh.devices.flat),
                                                         e.memory_budget_mib)
        found = lengths_lib.default_top_length(
            setup.l_max, document_lengths(documents), rows=e.batch_size,
            max_length=e.max_length,
            fits=memory_fits(placed, abstract_params, e.batch_size, budget))
        top = found.length
        if jax.process_count() > 1:   # host memory may differ: every process takes process 0's
            from jax.experimental import multihost_utils
            top = int(multihost_utils.broadcast_one_to_all(np.int64(top)))
        if jax.process_index() == 0:
            print(f"eval lengths up to {top} ({found.reason}; memory budget "
                  f"{budget / 2**20:.0f} MiB per device from {source})", flush=True)
    return build_eval_data(setup, placed.model_config, tokenizer, top_length=top,
                           documents=documents)


def perplexity_only(data: EvalData) -> EvalData:
    """`data` without the sliding-window and retrieval batches: what the periodic
    evaluations during training (eval.every_steps) run; the final one runs everything."""
    return dataclasses.replace(data, sliding={}, retrieval={}, ruler=None)


def retrieval_scoring(e) -> str:
    """e.retrieval_scoring (the typed eval section's), checked: "teacher_forced" or
    "generate"."""
    scoring = e.retrieval_scoring
    if scoring not in retrieval_lib.SCORING_MODES:
        raise ValueError(f"eval.retrieval_scoring must be one of {retrieval_lib.SCORING_MODES}, "
                         f"got {scoring!r}")
    return scoring


def greedy_generator(placed: ModelOnMesh, params):
    """(prompts [k, P], max_new_tokens) -> greedy tokens [k, max_new_tokens] with the
    model `placed` and `params`, on one device: the parameters (possibly sharded over the eval mesh)
    are gathered onto the first local device and a one-device model is rebuilt with dense
    attention (decoding attends over the KV cache; ring attention is not used). Single
    process only."""
    from flax import nnx

    from evaluation.generate import generate

    if jax.process_count() > 1:
        raise ValueError('eval.retrieval_scoring="generate" runs in a single process')
    device = jax.local_devices()[0]
    names = placed.mesh.axis_names
    one = jax.sharding.Mesh(np.array([device]).reshape((1,) * len(names)), names)
    graphdef, _, _ = model_on_mesh.abstract_model(decoding_config(placed.model_config), one)
    model = nnx.merge(graphdef, jax.device_put(params, jax.sharding.SingleDeviceSharding(device)))

    def generate_fn(prompts, new, pad_to=None):
        with mesh_lib.use_mesh(one):
            return generate(model, prompts, int(new), temperature=0.0, pad_to=pad_to)
    return generate_fn


def evaluate(placed: ModelOnMesh, params, data: EvalData, *, step: int | None = None,
             name: str = "") -> dict:
    """Score `params` of the model `placed` on every evaluation in `data`:
    {"perplexity_by_length": {...}, "retrieval": {...} or None, "ruler": {...} or None}."""
    scorer = Scorer(placed, params)
    progress = Progress(data.batch_count(), "eval")
    e = data.setup.settings
    mc = placed.model_config
    result = {"name": name, "step": step, "l_max": mc.l_max, "position": mc.position,
              "rope_theta": mc.rope_theta, "rope_scaling": mc.rope_scaling,
              **perplexity.same_target_perplexity(scorer, data.windows, progress, mc.vocab_size),
              "not_evaluable": dict(data.not_evaluable)}
    if data.sliding:
        result["sliding_window"] = perplexity.sliding_window_perplexity(
            scorer, data.sliding, e.sliding_stride, progress)
        result["loss_by_position"] = perplexity.loss_by_position(
            scorer, data.windows[max(data.lengths)], progress)
    retrieval = None
    if data.retrieval:
        threshold = e.retrieval_threshold
        scoring = retrieval_scoring(e)
        generate_fn = greedy_generator(placed, params) if scoring == "generate" else None
        retrieval = {"threshold": threshold, "scoring": scoring,
                     "tasks": retrieval_lib.score_grids(scorer, data.retrieval, threshold,
                                                        progress, generate_fn),
                     "not_evaluable": dict(data.retrieval_not_evaluable)}
    ruler = (score_ruler(placed, params, data.ruler, data.tokenizer, data.setup.eos_ids)
             if data.ruler else None)
    return {"perplexity_by_length": result, "retrieval": retrieval, "ruler": ruler}


def ruler_generator(placed: ModelOnMesh, params, long_from: int):
    """(prompt ids [P], max_new_tokens, pad_to) -> greedy new ids (pad_to: generate's, one
    compiled function per padded shape, or None). Prompts of >= long_from tokens on
    a placed whose mesh has seq > 1 are prefilled with ring attention over it (generate's
    mesh=, parameters whole on every device but split over tensor); the others are decoded
    on one device (greedy_generator)."""
    one_device = greedy_generator(placed, params)
    if placed.mesh.shape.get("seq", 1) <= 1 or jax.process_count() > 1:
        return lambda ids, new, pad_to=None: np.asarray(one_device(ids[None], new, pad_to))[0]
    from flax import nnx

    from evaluation.generate import generate

    compute = jax.device_put(params, mesh_lib.compute_shardings(placed.param_shardings))
    graphdef, _, _ = model_on_mesh.abstract_model(decoding_config(placed.model_config), placed.mesh)
    rows = placed.mesh.shape.get("data", 1) * placed.mesh.shape.get("fsdp", 1)

    def generate_fn(ids, new, pad_to=None):
        if len(ids) < long_from:
            return np.asarray(one_device(ids[None], new, pad_to))[0]
        with mesh_lib.use_mesh(placed.mesh):
            model = nnx.merge(graphdef, compute)
            out = generate(model, np.repeat(ids[None], rows, 0), int(new), temperature=0.0,
                           mesh=placed.mesh, pad_to=pad_to)
        return np.asarray(out)[0]
    return generate_fn


def score_ruler(placed: ModelOnMesh, params, ruler: dict, tokenizer, eos=()) -> dict:
    """Greedy generation of every RULER sample, scored with RULER's metrics: ruler.json's
    content, with "records" (one per sample) for ruler_samples.jsonl. A generation ends
    before its first token of `eos`."""
    generate_fn = ruler_generator(placed, params, long_from=placed.model_config.l_max)
    progress = Progress(len(ruler["samples"]), "ruler")
    # prompts of one length and answer budget are padded to the longest of them, so they
    # share one compiled generation (the tokens are those of the exact prompt); not under
    # the dynamic RoPE scaling, whose frequencies follow the padded length
    exact = (placed.model_config.rope_scaling or {}).get("rope_type") == "dynamic"
    bucket = {}
    for sample in ruler["samples"]:
        key = (sample["length"], sample["max_new_tokens"])
        bucket[key] = max(bucket.get(key, 0), len(sample["prompt_ids"]))
    records = []
    for sample in ruler["samples"]:
        pad_to = None if exact else bucket[(sample["length"], sample["max_new_tokens"])]
        new = generate_fn(sample["prompt_ids"], sample["max_new_tokens"], pad_to)
        new = [int(t) for t in new]
        for i, token in enumerate(new):
            if token in eos:
                new = new[:i]
                break
        prediction = tokenizer.decode(np.asarray(new, np.int32))
        records.append({"task": sample["task"], "length": sample["length"],
                        "tokens": sample["tokens"], "prompt": sample["prompt"],
                        "answers": sample["answers"], "prediction": prediction,
                        "score": ruler_lib.score_sample(sample["task"], prediction,
                                                        sample["answers"])})
        progress.advance(f"{sample['task']} {sample['length']}")
    usable = [L for L in ruler["lengths"] if f"@{L}" not in ruler["skipped"]]
    out = ruler_lib.summarise(records, usable, ruler["tasks"], ruler["skipped"],
                              ruler["threshold"])
    for length in ruler["lengths"]:             # lengths the model cannot evaluate: null
        for row in out["tasks"].values():
            row.setdefault(str(length), None)
        out["mean"].setdefault(str(length), None)
    out["mean"] = dict(sorted(out["mean"].items(), key=lambda kv: int(kv[0])))
    for task in out["tasks"]:
        out["tasks"][task] = dict(sorted(out["tasks"][task].items(), key=lambda kv: int(kv[0])))
    out["effective_length"] = ruler_lib.effective_length(out["mean"], ruler["threshold"])
    out["settings"] = ruler["settings"]
    out["records"] = records
    return out


def scalars(outcome: dict) -> dict[str, float]:
    """Flat scalars for metrics.jsonl / TensorBoard."""
    result = outcome["perplexity_by_length"]
    out = {}
    for length, ppl, loss in zip(result["lengths"], result["perplexity"], result["loss"]):
        out[f"perplexity_{length}"] = ppl
        out[f"loss_{length}"] = loss
    sliding = result.get("sliding_window")
    if sliding:
        for length, ppl in zip(sliding["lengths"], sliding["perplexity"]):
            out[f"sliding_perplexity_{length}"] = ppl
    for task, grid in ((outcome.get("retrieval") or {}).get("tasks") or {}).items():
        for length, accuracy in zip(grid["lengths"], grid["length_accuracy"]):
            out[f"retrieval_{task}_{length}"] = accuracy
        if grid["k_max"] is not None:
            out[f"retrieval_{task}_k_max"] = grid["k_max"]
    ruler = outcome.get("ruler") or {}
    for length, mean in (ruler.get("mean") or {}).items():
        if mean is not None:
            out[f"ruler_mean_{length}"] = mean
    if ruler.get("effective_length") is not None:
        out["ruler_effective_length"] = ruler["effective_length"]
    return out


EVAL_DATA_KEYS = ("source", "path", "text_field", "validation_percent")
CORPUS_FILE = "corpus.json"


def evaluation_data(settings, data):
    """The data section evaluation reads (typed sections in, typed out): the run's `data`,
    or with settings.data.source set, `data` with eval.data's source, path, text_field and
    validation_percent (-1: the run's) on top: another corpus scored with the run's
    tokenizer (eval.name must name where)."""
    other = settings.data
    if not other.source:
        return data
    if not settings.name:
        raise ValueError("eval.data.source scores another corpus: set eval.name so that its "
                         "results go to eval/<name>/ beside the run's own")
    changes = {key: getattr(other, key) for key in EVAL_DATA_KEYS
               if key != "validation_percent" or other.validation_percent >= 0}
    return dataclasses.replace(data, **changes)


def corpus_identity(data) -> dict:
    """What evaluation results were computed on (`data`: EvalSetup.data): the corpus keys
    and the tokenizer."""
    return {**{key: getattr(data, key) for key in EVAL_DATA_KEYS}, "tokenizer": data.tokenizer}


SETTINGS_FILE = "settings.json"
# the eval keys that decide what the results in an eval directory are
SETTING_KEYS = ("lengths", "max_length", "score_tokens", "max_batches", "sliding_stride",
                "sliding_max_windows", "rope_scaling", "rope_theta", "retrieval_tasks",
                "retrieval_lengths", "retrieval_samples", "retrieval_scoring")


def evaluation_settings(settings) -> dict:
    """The SETTING_KEYS of the typed eval section as JSON values."""
    def plain(value):
        return json.loads(json.dumps(value, sort_keys=True, default=str))
    return {key: plain(getattr(settings, key)) for key in SETTING_KEYS}


def check_eval_directory(eval_dir: str, setup: EvalSetup) -> None:
    """One ValueError line if eval_dir holds results of another corpus or of other settings
    (lengths, tasks, ...): evaluation files never overwrite those; another eval.name writes
    beside them. Writes nothing (record_eval_settings does, with the results)."""
    path, settings_path = os.path.join(eval_dir, CORPUS_FILE), os.path.join(eval_dir, SETTINGS_FILE)
    identity, settings = corpus_identity(setup.data), evaluation_settings(setup.settings)
    if os.path.exists(path):
        held = _read_json(path)
        if held != identity:
            raise ValueError(f"{eval_dir} holds results of another corpus ({held.get('source')} "
                             f"{held.get('path')!r}, tokenizer {held.get('tokenizer')!r}); set "
                             f"eval.name to write these elsewhere")
    if os.path.exists(settings_path):
        held = _read_json(settings_path)
        for key in SETTING_KEYS:
            if key in held and held[key] != settings[key]:
                raise ValueError(
                    f"{eval_dir} holds results for eval.{key} = {held[key]!r}, not "
                    f"{settings[key]!r}: set --config.eval.name=NAME to write these to "
                    f"{os.path.join(eval_dir, 'NAME')}/ beside them (or remove {eval_dir})")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            held = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error}): remove it, or set "
                         f"eval.name to write elsewhere") from None
    if not isinstance(held, dict):
        raise ValueError(f"{path} holds {type(held).__name__}, not an object: remove it, or "
                         f"set eval.name to write elsewhere")
    return held


def record_eval_settings(eval_dir: str, setup: EvalSetup, is_writer: bool = True) -> None:
    """Write which corpus and settings eval_dir's results are of, beside the results: only
    an evaluation that produced results records them (a refused one leaves nothing)."""
    if not is_writer:
        return
    os.makedirs(eval_dir, exist_ok=True)
    for name, value in ((CORPUS_FILE, corpus_identity(setup.data)),
                        (SETTINGS_FILE, evaluation_settings(setup.settings))):
        target = os.path.join(eval_dir, name)
        with open(target + ".tmp", "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(target + ".tmp", target)


def eval_directory(workdir: str, name: str = "") -> str:
    return os.path.join(workdir, "eval", name) if name else os.path.join(workdir, "eval")


def write_results(outcome: dict, eval_dir: str, is_writer: bool = True) -> None:
    """perplexity_by_length.json/.csv, retrieval.json, PNG plots and summary.md."""
    if not is_writer:
        return
    os.makedirs(eval_dir, exist_ok=True)
    result = outcome["perplexity_by_length"]
    with open(os.path.join(eval_dir, "perplexity_by_length.json"), "w") as f:
        json_values.dump(result, f, indent=2)
    window = result.get("sliding_window") or {}
    sliding = dict(zip(window.get("lengths", []), window.get("perplexity", [])))
    with open(os.path.join(eval_dir, "perplexity_by_length.csv"), "w", newline="") as f:
        table = csv.writer(f)
        table.writerow(["length", "loss", "perplexity", "sliding_window_perplexity",
                        "unigram_perplexity", "target_tokens"])
        for row in zip(result["lengths"], result["loss"], result["perplexity"],
                       [sliding.get(L, "") for L in result["lengths"]],
                       result["unigram_perplexity"], result["target_tokens"]):
            table.writerow(row)
    if outcome.get("retrieval"):
        with open(os.path.join(eval_dir, "retrieval.json"), "w") as f:
            json_values.dump(outcome["retrieval"], f, indent=2)
    if outcome.get("ruler"):
        ruler = {k: v for k, v in outcome["ruler"].items() if k != "records"}
        with open(os.path.join(eval_dir, "ruler.json"), "w") as f:
            json_values.dump(ruler, f, indent=2)
        with open(os.path.join(eval_dir, "ruler_samples.jsonl"), "w") as f:
            for record in outcome["ruler"]["records"]:
                f.write(json.dumps(record) + "\n")
    report.write_plots(eval_dir)
    report.write_summary(eval_dir)
