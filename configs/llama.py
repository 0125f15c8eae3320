"""The Llama presets (architectures of their Hugging Face config.json) for plans and
long-context runs, chosen by the argument after the file name:

  python main.py --mode plan --config configs/llama.py:llama2_7b --config.plan.devices=8 \\
      --config.curriculum.l_max=L [--config.plan.memory_budget_gib=80]

llama2_7b: vocab 32000, d_model 4096, MLP 11008, 32 layers, 32 query = 32 key-value heads of
  128, RoPE theta 10,000, trained at 4096 positions.
llama3_8b: vocab 128256, d_model 4096, MLP 14336, 32 layers, 32 query / 8 key-value heads of
  128, RoPE theta 500,000, trained at 8192 positions (Llama 3.1 adds the llama3 scaling:
  --config.model.rope.scaling='{"rope_type": "llama3", "factor": 8,
  "original_max_position_embeddings": 8192}').
Both: untied LM head, RMSNorm eps 1e-5. The run settings are those of the memory table in
docs/parallelism.md: bf16 compute over float32 parameters, full rematerialisation of every
layer and of groups of 4 layers (8 of the 32 layer inputs kept through the forward pass),
the MLP in chunks of 16384 tokens and the LM head + loss in chunks of 4096, ring attention
over every device (mesh.seq = -1), one row per step. Weights come from a Hugging Face
checkpoint (`--mode import`, then train.init_from). configs/llama2_7b.py and
configs/llama3_8b.py are these presets under their own file names.

llama2_7b_4m, llama3_8b_4m: the same shapes at 4,194,304 tokens a row on 8 GPUs (mesh.seq =
8): Ulysses attention, and every layer's input offloaded to pinned host memory
(model.remat = offload, remat_group = 1). Compiled for 8 H100s (compile-only) a step needs
79.2 GiB (Llama-2-7B) and 66.4 GiB (Llama-3-8B) per device, with 128 GiB of host memory
each; with full remat and no offload 124 and 112 GiB (docs/parallelism.md).
"""
from configs import base

# name -> (vocab, d_model, mlp_dim, n_layers, q_heads, kv_heads, head_dim, rope theta, l_max)
PRESETS = {"llama2_7b": (32000, 4096, 11008, 32, 32, 32, 128, 10000.0, 4096),
           "llama3_8b": (128256, 4096, 14336, 32, 32, 8, 128, 500000.0, 8192)}
# the four-million-token recipes: name -> the shape they run
FOUR_MILLION = {"llama2_7b_4m": "llama2_7b", "llama3_8b_4m": "llama3_8b"}


def get_config(preset: str = ""):
    if preset in FOUR_MILLION:
        return four_million(get_config(FOUR_MILLION[preset]))
    if preset not in PRESETS:
        raise ValueError(f"configs/llama.py needs a preset after a colon, one of "
                         f"{sorted([*PRESETS, *FOUR_MILLION])} (e.g. configs/llama.py:llama2_7b), "
                         f"got {preset!r}")
    vocab, d_model, mlp_dim, n_layers, q_heads, kv_heads, head_dim, theta, l_max = \
        PRESETS[preset]
    config = base.get_config()
    model_settings = config.model
    model_settings.vocab_size, model_settings.d_model = vocab, d_model
    model_settings.mlp_dim, model_settings.n_layers = mlp_dim, n_layers
    model_settings.q_heads, model_settings.kv_heads = q_heads, kv_heads
    model_settings.head_dim = head_dim
    model_settings.rope.theta = theta
    model_settings.tie_embeddings = False
    model_settings.norm_eps = 1e-5
    model_settings.dtype, model_settings.param_dtype = "bfloat16", "float32"
    model_settings.remat = "full"
    model_settings.remat_group = 4
    model_settings.mlp_chunk_tokens = 16384
    model_settings.loss_chunk_tokens = 4096
    model_settings.attention = "ring"
    model_settings.block_q = model_settings.block_k = 512
    config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, -1, 1
    config.curriculum.l_max = l_max
    config.train.batch_size = 1
    config.eval.batch_size = 1
    return config


def four_million(config):
    """A preset's config with the recipe that fits 4,194,304 tokens on 8 H100s."""
    config.mesh.seq = 8
    config.model.attention = "ulysses"
    config.model.remat, config.model.remat_group = "offload", 1
    config.curriculum.l_max = 4 * 2**20
    config.eval.lengths = (4 * 2**20,)
    return config

