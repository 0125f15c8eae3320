"""Hugging Face checkpoints <-> workdirs: `--mode import` and `--mode export`.

import: HF directory -> W/config.json (configs/base.py with the model section and
curriculum.l_max of the checkpoint, its tokenizer.json copied to W) + an Orbax checkpoint at
step 0 (the weights in the run's shardings, a fresh optimizer state), so W evaluates with
`--mode eval --workdir W` and starts other runs with `--config.train.init_from=W`.
export: W's newest checkpoint -> a directory transformers loads (model/hf.save_model);
a non-empty directory only with overwrite=True and when it holds an earlier export and
nothing else, replaced whole (export_workdir); never a workdir or a directory in or around
one (check_export_target). Both check their paths before main.py locks the workdir.
Import keeps what the weights alone do not say: the compute dtype (model.dtype) and the
bos/eos/pad ids (generate.bos_id / eos_ids / pad_id), which export writes back.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

import jax
from flax import nnx

from cli.workdir_lock import LOCK_FILE
from configs import workdir_config
from data.tokenizers import write_byte_tokenizer_json
from model import hf
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from train import checkpoint as checkpoint_lib
from train.checkpoint import checkpoint_meta, restore_newest
from train.state import build_run
from train.run_spec import resolve

HF_ARCHITECTURE = "hf_architecture"   # checkpoint metadata: the architecture imported from
CHECKPOINTS = "checkpoints"           # what a run writes (train/trainer.py, train/metrics.py)
METRICS = "metrics.jsonl"


def check_import_paths(hf_dir: str, workdir: str) -> None:
    """One ValueError line when importing `hf_dir` into `workdir` would write over something:
    a --workdir that is, lies inside or contains --hf_dir (real paths: symlinks and '..'
    resolved), that already holds checkpoints, or that holds a Hugging Face model.
    Reads only; main.py calls it before taking the workdir's lock."""
    source, target = os.path.realpath(hf_dir), os.path.realpath(workdir)
    if source == target:
        raise ValueError(f"--workdir {workdir} is the --hf_dir {hf_dir} itself: the import would "
                         "write its config.json over the Hugging Face model's; give a new "
                         "--workdir")
    if _inside(target, source):
        raise ValueError(f"--workdir {workdir} is inside --hf_dir {hf_dir}: import into a "
                         "directory outside the Hugging Face model's")
    if _inside(source, target):
        raise ValueError(f"--hf_dir {hf_dir} is inside --workdir {workdir}: the import writes "
                         "into the workdir and could overwrite the model's files; import into "
                         "a directory that does not contain it")
    if os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        raise ValueError(f"{workdir} already holds checkpoints; import into a new --workdir")
    named = workdir_config.hf_model_keys(workdir)
    if named:
        raise ValueError(f"--workdir {workdir} holds a Hugging Face model (its config.json names "
                         f"{named}): the import would write over it; import into a new "
                         "--workdir")


def import_workdir(hf_dir: str, workdir: str) -> str:
    """Write `workdir` from the Hugging Face checkpoint in `hf_dir`; returns the summary
    line. Refuses what check_import_paths refuses, and a checkpoint it cannot take whole
    (model/hf.py: an unsupported config.json, a tensor it has no place for, a non-finite
    weight, a bos/eos/pad id outside the vocabulary); nothing is written into `workdir`
    before every tensor has been read."""
    check_import_paths(hf_dir, workdir)
    model_config, architecture = hf.load_config(hf_dir)
    ids = hf.special_token_ids(hf_dir, vocab_size=model_config.vocab_size)
    tokenizer = "bytes"
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        # read from hf_dir until the weights are in; then copied to the workdir
        tokenizer = os.path.abspath(os.path.join(hf_dir, "tokenizer.json"))
    # what the checkpoint computes in, not configs/base.py's bfloat16: generation and
    # evaluation of a float32 checkpoint give transformers' tokens
    dtype, dtype_origin = hf.compute_dtype(hf_dir)

    spec = resolve(workdir_config.config_of_model(model_config, tokenizer=tokenizer,
                                                  dtype=dtype, token_ids=ids),
                   workdir, mode="import")
    run = build_run(spec.settings, tokenizer=spec.tokenizer)
    # the run's model placed on its mesh: each process reads the slices its devices hold
    _, abstract_params, shardings = model_on_mesh.abstract_model(run.model_config, run.mesh,
                                                                 run.attention_fn)
    params = hf.load_params(hf_dir, abstract_params, shardings)
    if tokenizer != "bytes":
        tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            # the files beside tokenizer.json travel with it (export copies them back out)
            for name in hf.TOKENIZER_FILES:
                if os.path.isfile(os.path.join(hf_dir, name)):
                    shutil.copy(os.path.join(hf_dir, name), os.path.join(workdir, name))
    # the workdir's config names the tokenizer it now holds
    config_json = workdir_config.to_json(workdir_config.config_of_model(
        model_config, tokenizer=tokenizer, dtype=dtype, token_ids=ids))
    with mesh_lib.use_mesh(run.mesh):
        opt_state = jax.jit(run.optimizer.init,
                            out_shardings=run.state_shardings["opt_state"])(params)
    meta = checkpoint_meta(run, config_json, 0, 0,
                           **{HF_ARCHITECTURE: architecture})
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINTS),
                                               max_to_keep=1, async_save=False)
    try:
        checkpointer.save(0, {"params": params, "opt_state": opt_state}, None, meta)
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        workdir_config.write_text(config_json, workdir)
    count = sum(x.size for x in jax.tree.leaves(params))
    return (f"imported {architecture} ({count / 1e6:.2f}M parameters, l_max "
            f"{model_config.l_max}, tokenizer {tokenizer}) into {workdir}; compute "
            f"dtype {dtype} ({dtype_origin})")


def export_workdir(workdir: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the newest checkpoint of `workdir` as a Hugging Face directory `out_dir`;
    returns the summary line.

    A missing or empty `out_dir` is written in place. A non-empty one is refused unless
    `overwrite` and it holds only an earlier export's files (check_export_target); then
    the export is written into a fresh sibling `<out_dir>.tmp-<pid>` and
    swapped in (the old directory renamed to `<out_dir>.old-<pid>`, the new one renamed
    to `out_dir`, the old one deleted): no file of the old directory survives, and a crash
    leaves the old or the new directory whole."""
    replace = check_export_target(workdir, out_dir, overwrite)
    spec = resolve(workdir_config.load(workdir), workdir, mode="export")
    settings = spec.settings
    run = build_run(settings, tokenizer=spec.tokenizer)
    state, meta = restore_newest(workdir, run, "--mode export")
    model = nnx.merge(run.graphdef, state["params"])
    tokenizer = settings.data.tokenizer
    target = os.path.realpath(out_dir)     # a symlink's directory is the one replaced
    writer = jax.process_index() == 0
    staging = f"{target}.tmp-{os.getpid()}" if replace else target
    if replace and writer and os.path.lexists(staging):
        shutil.rmtree(staging)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if tokenizer == "bytes":
                tokenizer = write_byte_tokenizer_json(os.path.join(scratch, "tokenizer.json"))
            elif not tokenizer.endswith(".json"):
                raise ValueError(f"--mode export: data.tokenizer {tokenizer!r} is not a Hugging "
                                 f"Face tokenizer.json or 'bytes'; only those are exported")
            hf.save_model(model, staging, tokenizer_path=tokenizer,
                          architecture=meta.get(HF_ARCHITECTURE),
                          eos_token_ids=list(settings.generate.eos_ids),
                          bos_token_id=settings.generate.bos_id,
                          pad_token_id=settings.generate.pad_id)
    except BaseException:
        if replace and writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace and writer:
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    return (f"exported step {meta['step']} of {workdir} to {out_dir}"
            + (" (its previous contents replaced)" if replace else ""))


def check_export_target(workdir: str, out_dir: str, overwrite: bool) -> bool:
    """Whether `out_dir` holds files that the export replaces (only with `overwrite`);
    one ValueError line when it may not be written. Reads only; main.py calls it before
    taking the workdir's lock.

    Refused with or without `overwrite`: a `workdir` that is a Hugging Face model directory;
    an `out_dir` that is not a directory, is or lies inside `workdir` or any other workdir
    (run_evidence), or holds `workdir` or another workdir. A non-empty `out_dir` needs
    `overwrite`, and even then every entry must be a file an export writes
    (model/hf.is_export_file): an earlier export is replaced, nothing else is."""
    workdir_config.check_not_hf_model(workdir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--hf_dir {out_dir} exists and is not a directory")
    target, source = os.path.realpath(out_dir), os.path.realpath(workdir)
    if target == source:
        raise ValueError(f"--hf_dir {out_dir} is the workdir {workdir} itself: export to a "
                         "directory outside any workdir")
    if _inside(target, source):
        raise ValueError(f"--hf_dir {out_dir} is inside the workdir {workdir}: export to a "
                         "directory outside any workdir")
    if _inside(source, target):
        raise ValueError(f"--hf_dir {out_dir} holds the workdir {workdir}: --overwrite would "
                         "delete it; export to another --hf_dir")
    evidence = run_evidence(target)
    if evidence:
        raise ValueError(f"--hf_dir {out_dir} is a workdir (it holds {evidence}), not an "
                         "export: export to a directory outside any workdir")
    ancestor = os.path.dirname(target)
    while True:
        evidence = run_evidence(ancestor, strict=True)
        if evidence:
            raise ValueError(f"--hf_dir {out_dir} is inside the workdir {ancestor} (it holds "
                             f"{evidence}): export to a directory outside any workdir")
        if os.path.dirname(ancestor) == ancestor:
            break
        ancestor = os.path.dirname(ancestor)
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return False
    for name in entries:
        path = os.path.join(out_dir, name)
        evidence = run_evidence(path) if _is_directory(path) else None
        if evidence:
            raise ValueError(f"--hf_dir {out_dir} holds the workdir {path} (it holds "
                             f"{evidence}): export to another --hf_dir")
    if not overwrite:
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise ValueError(f"--hf_dir {out_dir} is not empty ({count}, e.g. {entries[0]!r}); "
                         "give --overwrite to replace its contents, or another --hf_dir")
    foreign = [name + ("/" if _is_directory(os.path.join(out_dir, name)) else "")
               for name in entries
               if _is_directory(os.path.join(out_dir, name)) or not hf.is_export_file(name)]
    if foreign:
        shown = ", ".join(repr(name) for name in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ValueError(f"--hf_dir {out_dir} holds {len(foreign)} "
                         f"{'entry' if len(foreign) == 1 else 'entries'} an export does not "
                         f"write ({shown}{more}): --overwrite replaces only an earlier export "
                         f"(files named {', '.join(hf.EXPORT_FILES)} or "
                         "model-NNNNN-of-NNNNN.safetensors); move them away or give another "
                         "--hf_dir")
    return True


def run_evidence(directory: str, strict: bool = False) -> str | None:
    """What shows that `directory` holds a Boundless run, or None: a config.json of a run
    (configs/workdir_config.py writes it: "model" and "train" sections), a checkpoints/
    directory, a metrics.jsonl or the workdir lock's file. `strict` (for the directories
    above an export's): only config.json, or checkpoints/ with an Orbax step in it (a name
    that starts with a digit), so that a home directory with a checkpoints/ folder or a
    `.lock` of another tool (pytest's numbered directories have one) is not taken for one."""
    if not _is_directory(directory):
        return None
    config = os.path.join(directory, workdir_config.CONFIG_FILE)
    if os.path.isfile(config) and os.path.getsize(config) < 10**7:
        try:
            with open(config) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("model"), dict) and \
                isinstance(saved.get("train"), dict):
            return f"{workdir_config.CONFIG_FILE} of a Boundless run"
    checkpoints = os.path.join(directory, CHECKPOINTS)
    if os.path.isdir(checkpoints):
        try:
            steps = [n for n in os.listdir(checkpoints) if n[:1].isdigit()]
        except OSError:
            steps = []
        if steps or not strict:
            return f"{CHECKPOINTS}/"
    if strict:
        return None
    if os.path.isfile(os.path.join(directory, METRICS)):
        return METRICS
    if os.path.isfile(os.path.join(directory, LOCK_FILE)):
        return f"{LOCK_FILE}, the workdir lock's file"
    return None


def _is_directory(path: str) -> bool:
    """A directory, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _inside(path: str, directory: str) -> bool:
    """Whether real path `path` lies strictly below real path `directory`."""
    return path != directory and os.path.commonpath([path, directory]) == directory
