"""A workdir's model next to transformers running its export: the same logits?

    python -m benchmarks.hf_parity --workdir W --hf_dir OUT [--lengths 128,256,512]

Restores W's newest checkpoint on one device (float32 compute, dense attention, W's RoPE),
loads OUT (written by `main.py --mode export --workdir W --hf_dir OUT`) with
`transformers.AutoModelForCausalLM` (CPU torch, float32), feeds both the first tokens of
held-out validation documents of W's corpus, and prints per length the largest absolute
logit difference relative to the largest |logit| and the share of positions whose argmax
agrees. Needs torch + transformers (tests/requirements.txt).
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from benchmarks.common import int_list
from configs.sections import settings as settings_of


def ours_and_theirs(workdir: str, hf_dir: str, lengths: list[int], rows: int = 2):
    """[(length, relative max |diff|, argmax agreement)] over `rows` documents."""
    import jax
    import torch
    import transformers
    from flax import nnx

    from data.sources import list_documents
    from model.transformer import Transformer
    from parallel import mesh as mesh_lib
    from configs import workdir_config
    from train.state import build_run
    from train.checkpoint import restore_newest

    config = workdir_config.load(workdir)
    for axis in ("data", "fsdp", "seq", "tensor"):
        config.mesh[axis] = 1
    run = build_run(settings_of(config), devices=jax.local_devices()[:1])
    state, _ = restore_newest(workdir, run, "hf_parity")
    model_config = dataclasses.replace(run.model_config, dtype="float32", attention="dense",
                                       remat="none")
    with mesh_lib.use_mesh(run.mesh):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config,
                                                                   rngs=nnx.Rngs(0))), nnx.Param)
    ours = nnx.merge(graphdef, state["params"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir,
                                                               dtype=torch.float32).eval()
    documents = [run.tokenizer.encode(text) for text in list_documents(config.data, "validation")]
    longest = max(lengths)
    ids = np.stack([d[:longest] for d in documents if len(d) >= longest][:rows])   # [rows, L]
    results = []
    for length in lengths:
        batch = ids[:, :length]
        with mesh_lib.use_mesh(run.mesh):
            mine = np.asarray(jax.jit(lambda t: ours(t))(batch))
        with torch.no_grad():
            reference = theirs(torch.tensor(batch, dtype=torch.long)).logits.numpy()
        error = float(np.abs(mine - reference).max() / np.abs(reference).max())
        agree = float((mine.argmax(-1) == reference.argmax(-1)).mean())
        results.append((length, error, agree))
    return results


def main(argv=None):
    from util.tables import format_table
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_parity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--lengths", type=int_list, default=[128, 256, 512])
    args = parser.parse_args(argv)
    results = ours_and_theirs(args.workdir, args.hf_dir, args.lengths)
    print(f"{args.workdir} (Boundless) vs {args.hf_dir} (transformers), float32, 2 held-out "
          "documents per length")
    print(format_table(["length", "max logit difference / max logit", "same argmax"],
                       [[length, f"{error:.1e}", f"{agree:.4f}"]
                        for length, error, agree in results]))


if __name__ == "__main__":
    main()
