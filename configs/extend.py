"""Position Interpolation (Chen et al. 2023): fine-tune a trained model at a longer context.

  python main.py --config configs/extend.py --workdir OUT \
      --config.train.init_from=W --config.extend.target_length=1024 \
      [--config.extend.scaling=yarn] [--config.mesh.seq=4]

The model (its parameter-defining keys, RoPE base and tokenizer) comes from workdir W's
config.json and its parameters from W's newest checkpoint (train.init_from). The trainer
then resolves the `extend` section against W (configs/extension.py; the config file cannot,
because --config.train.init_from is applied after get_config() runs): with L0 the longest
length W trained at (its curriculum.l_max for a one-level run),
  curriculum.l_max = target_length (L0 recorded in W_out/run_state.json),
  model.rope.scaling = {"rope_type": "linear", "factor": target_length / L0}, or with
    --config.extend.scaling=yarn {"rope_type": "yarn", "factor": target_length / L0,
    "original_max_position_embeddings": L0} (linear needs no L0: its frequencies are
    theta^(-2i/d) / factor; yarn's depend on L0, which must not default to the new l_max),
  for learned positions instead: model.learned_positions_length = target_length (W's table
    interpolated to the new rows),
  model.attention = "ring" when mesh.seq > 1,
  train.warmup_fraction = extend.warmup_steps / train.steps,
and prints what it set; OUT/config.json holds the resolved keys.

The rest are the paper's fine-tuning settings: AdamW (beta 0.9 / 0.95), learning rate 2e-5
with a linear warmup of 20 steps and then constant (no decay), no weight decay, 1000 steps
of 64 sequences of target_length tokens.

A demo on a 2-core CPU, from the tiny model (`python main.py --config configs/tiny.py`,
l_max 256) to 1024 (the settings of benchmarks/length_extrapolation.py's fine-tune):

  python main.py --config configs/extend.py --workdir ~/boundless_workdirs/tiny_pi4 \
      --config.train.init_from=$HOME/boundless_workdirs/tiny --config.extend.target_length=1024 \
      --config.model.dtype=float32 --config.model.block_q=128 --config.model.block_k=128 \
      --config.train.steps=60 --config.train.batch_size=4 --config.train.learning_rate=2e-4 \
      --config.extend.warmup_steps=3 --config.eval.lengths='(256,512,1024,2048)'
(eval.lengths: the default lengths go to at least 8 x target_length.)
"""
from configs import base


def get_config():
    config = base.get_config()
    config.extend.target_length = -1      # required: the new context length (-1: not given)
    config.extend.scaling = "linear"
    config.extend.warmup_steps = 20
    config.curriculum.levels = 1
    config.train.steps = 1000
    config.train.batch_size = 64
    config.train.learning_rate = 2e-5
    config.train.min_learning_rate_ratio = 1.0   # constant after the warmup
    config.train.weight_decay = 0.0
    config.train.beta1 = 0.9
    config.train.beta2 = 0.95
    return config
