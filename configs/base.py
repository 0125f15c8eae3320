"""Default configuration: every key the project reads, with its default and its rule.

Each key is declared once, `section.key = default, rule` (configs/rules.py): the rule is
its type and range, which `check(config)` tests before a run creates anything. Other
configs start from `get_config()` here and change what they need, so a key that is not in
this file does not exist (ml_collections rejects misspelled overrides).
"""
import difflib

from ml_collections import config_dict

from configs import rules
from configs.rules import anything, flag, integer, items, number, plain_name, text
# Each set of allowed values is the owning room's own tuple, from modules that import no jax
# (the command line is checked against this file before jax is imported quietly: main.py)
from data.sources import PREPARED
from data.sources import SOURCES as TEXT_SOURCES
from data.retrieval_tasks import TASKS as RETRIEVAL_TASKS
from evaluation.retrieval import SCORING_MODES
from evaluation.ruler import ALL_TASKS as RULER_TASKS
from model.choices import (ATTENTION_KINDS, DTYPES, LAYER_TYPES, MLP_KINDS, NORM_KINDS,
                           POSITION_KINDS, REMAT_POLICIES, SEQUENCE_PARALLEL)
from model.model_config import defaults as model_defaults
from parallel.choices import KERNELS, LAYOUT_SETTINGS
from parallel.targets import NAMES as TARGETS      # the accelerators a plan compiles for

# key -> Rule and key -> the line of this file declaring it, filled by get_config()
RULES: dict[str, rules.Rule] = {}
LINES: dict[str, int] = {}
SOURCES = TEXT_SOURCES + (PREPARED,)
MODEL = model_defaults()        # ModelConfig's defaults: the model keys' defaults, stated once
# The sets train/ owns are stated here, and train/ imports them (train/ reads the config)
CURRICULUM_UNITS = ("tokens", "sequences")
CURRICULUM_ORDERS = ("ascending", "interleaved")
EXTEND_SCALINGS = ("linear", "yarn")
OPTIMIZER_MEMORIES = ("device", "host")


def get_config() -> config_dict.ConfigDict:
    root = rules.Section(config_dict.ConfigDict(), "", RULES, LINES)
    # parameter initialisation (and everything else not seeded by its own key)
    root.seed = 0, integer(0)

    # --- model ------------------------------------------------------------------------
    model = root.section("model")
    model.vocab_size = 0, integer(0)  # 0: take the tokenizer's vocabulary size
    model.d_model = 512, integer(1)  # width of the residual stream
    model.n_layers = 8, integer(1)  # decoder blocks
    model.q_heads = 8, integer(1)  # query heads
    model.kv_heads = 8, integer(1)  # grouped-query attention when < q_heads
    model.head_dim = 64, integer(1)  # width of each attention head
    model.mlp_dim = 1408, integer(1)  # MLP hidden width
    model.position = MODEL["position"], text(POSITION_KINDS)  # rope | learned | none
    rope = model.section("rope")
    rope.theta = MODEL["rope_theta"], number(above=0)  # RoPE base: frequencies theta^(-2i/head_dim)
    # None, or a Hugging Face `rope_scaling` dict, e.g. {"rope_type": "linear", "factor": 4.0}.
    # On the command line give it as JSON: --config.model.rope.scaling='{"rope_type": ...}'.
    rope.scaling = None, anything()
    # dense | blockwise | ring | ulysses | allgather | hybrid (the last four split the
    # sequence over mesh.seq: parallel/sequence_parallel.py)
    model.attention = MODEL["attention"], text(ATTENTION_KINDS)
    # hybrid: all-to-all inside groups of this many neighbouring devices (a divisor of
    # mesh.seq), ring across the groups
    model.ulysses_degree = None, integer(1, optional=True)
    # the per-device kernel: auto | blockwise | cudnn (NVIDIA GPUs, whole-sequence calls on
    # one device or with ulysses, rows that are one document in order) | pallas (our Pallas
    # kernel in every strategy and hop: Triton on GPUs, Mosaic on TPUs, interpreted on the
    # CPU, slow); auto: on a GPU cudnn where it applies, else pallas; on a TPU pallas;
    # blockwise on the CPU and for heads other than bf16/fp16 of 64, 128 or 256 (said once)
    model.attention_kernel = "auto", text(KERNELS)
    # largest query / key-value block of the blockwise/ring kernels; any length runs (a
    # sequence is padded internally by less than one block)
    model.block_q = MODEL["block_q"], integer(1)
    model.block_k = MODEL["block_k"], integer(1)  # key-value block (see block_q)
    # None, or w: each token attends to itself and the w - 1 tokens before it (Mistral's
    # and Qwen2's sliding window); model.layer_types picks the layers that have it
    model.sliding_window = MODEL["sliding_window"], integer(1, optional=True)
    # None (with a window: every layer), or per layer "sliding_attention" | "full_attention"
    # as in Hugging Face configs, e.g. --config.model.layer_types='("full_attention", ...)'
    model.layer_types = MODEL["layer_types"], items(text(LAYER_TYPES), optional=True)
    # the LM head is the token embedding transposed
    model.tie_embeddings = MODEL["tie_embeddings"], flag()
    # compute dtype of activations and matmuls
    model.dtype = MODEL["dtype"], text(DTYPES)
    # dtype the parameters are stored (and optimised) in
    model.param_dtype = MODEL["param_dtype"], text(DTYPES)
    # recompute in the backward pass (model/remat.py): none | full | save_dots |
    # save_attention_out | offload (as full, each layer's input kept in pinned host memory) |
    # offload_attention (offload, and the attention's output and log-sum-exp in host memory)
    model.remat = MODEL["remat"], text(REMAT_POLICIES)
    # lax.scan over the stacked layers (False: a Python loop)
    model.scan_layers = MODEL["scan_layers"], flag()
    # > 0: the LM head and loss run in chunks of about this many tokens per row, so
    # [tokens, vocab] logits are never held (a multiple of mesh.seq that divides the
    # lengths keeps every chunk on its devices); 0: all logits at once
    model.loss_chunk_tokens = MODEL["loss_chunk_tokens"], integer(0)
    # > 0: the MLP (and its norm) runs in chunks of this many tokens per row, each
    # rematerialised (the feed-forward half of a blockwise transformer); 0: whole
    model.mlp_chunk_tokens = MODEL["mlp_chunk_tokens"], integer(0)
    # with model.remat != "none" and scanned layers: rematerialise this many layers as a
    # group too, keeping n_layers / remat_group layer inputs (must divide n_layers)
    model.remat_group = MODEL["remat_group"], integer(1)
    model.norm_eps = MODEL["norm_eps"], number(above=0)  # epsilon of RMSNorm / LayerNorm
    # std of the normal initialisation of the weights
    model.init_std = MODEL["init_std"], number(above=0)
    # Architecture options (defaults: Llama/Mistral; Qwen2 adds qkv_bias; GPT-2 is layernorm,
    # gelu_tanh, every bias, position="learned"). No separate norm-bias key: layernorm always
    # has scale and bias (as GPT-2's does), rmsnorm only a scale.
    model.norm = MODEL["norm"], text(NORM_KINDS)  # rmsnorm | layernorm
    # swiglu (gate/up/down) | gelu_tanh (in -> tanh-GELU -> out)
    model.mlp = MODEL["mlp"], text(MLP_KINDS)
    model.qkv_bias = MODEL["qkv_bias"], flag()  # biases on the q, k, v projections
    # bias on the attention output projection
    model.attention_out_bias = MODEL["attention_out_bias"], flag()
    model.mlp_bias = MODEL["mlp_bias"], flag()  # biases on the MLP's matrices
    # position="learned" only: rows of the position table (the longest length the model
    # can run; ModelConfig.l_max). 0: curriculum.l_max rows. When it differs from the table
    # of the train.init_from checkpoint, that table is resized to it by linear interpolation
    # along the position axis (the learned-table analogue of Position Interpolation).
    model.learned_positions_length = 0, integer(0)

    # --- data -------------------------------------------------------------------------
    data = root.section("data")
    # stdlib | text | jsonl | parquet (read and tokenized when the run starts) | prepared
    # (data.path = a directory made by --mode prepare, memory-mapped)
    data.source = "stdlib", text(SOURCES)
    data.path = "", text()  # glob or file for text/jsonl/parquet; directory for prepared
    data.text_field = "text", text()  # JSONL key / Parquet column holding the document text
    # bytes | path/to/model.model (SentencePiece) | path/to/tokenizer.json
    data.tokenizer = "bytes", text()
    # share of documents (by hash of their path/index) held out
    data.validation_percent = 5, number(0, 100)
    data.shuffle_seed = 0, integer(0)  # seed of the training stream's epochs
    data.prepare_dir = "", text()  # --mode prepare: where the prepared shards go
    data.prepare_workers = 0, integer(0)  # --mode prepare: worker processes (0: one per core)
    # Synthetic retrieval documents (data/retrieval_tasks.py) mixed into the TRAINING documents;
    # validation stays pure corpus, so perplexities stay comparable. Each sample is one
    # document of prompt + answer tokens, its length uniform in [min, max], depth in [0, 1].
    # share of training documents that are synthetic, [0, 1); 0: none
    data.retrieval_fraction = 0.0, number(0, below=1)
    # tasks drawn uniformly per sample
    data.retrieval_tasks = RETRIEVAL_TASKS, items(text(RETRIEVAL_TASKS), nonempty=True)
    # shortest sample in tokens; 0: curriculum.l_max // 4
    data.retrieval_min_length = 0, integer(0)
    # longest sample in tokens (<= seq_len); 0: the training seq_len
    data.retrieval_max_length = 0, integer(0)
    # loss weight of the answer tokens (others: 1)
    data.retrieval_answer_weight = 1.0, number(above=0)
    # one weight >= 0 per task of retrieval_tasks (0: never drawn; not all 0); None: uniform
    data.retrieval_task_weights = None, items(number(0), optional=True)

    # --- training ---------------------------------------------------------------------
    train = root.section("train")
    # optimizer steps of the whole run (all levels); at most 10 million, 20x Llama 2's 500k
    # (the curriculum holds its level schedule, one entry a step, in memory)
    train.steps = 1000, integer(1, 10_000_000)
    train.batch_size = 32, integer(1)  # global rows per step at l_max
    train.learning_rate = 3e-4, number(above=0)  # peak learning rate of AdamW
    # cosine decays to this fraction of the peak
    train.min_learning_rate_ratio = 0.1, number(0, 1)
    train.warmup_fraction = 0.02, number(0, 1)  # share of the token budget spent warming up
    train.weight_decay = 0.1, number(0)  # AdamW weight decay (matrices only, unless the key below)
    # also decay norm scales, biases and embeddings
    train.decay_norms_and_embeddings = False, flag()
    train.beta1 = 0.9, number(0, below=1)  # AdamW's first-moment decay
    train.beta2 = 0.95, number(0, below=1)  # AdamW's second-moment decay
    train.grad_clip_norm = 1.0, number(0)  # clip the global gradient norm to this (0: no clipping)
    train.grad_accum_steps = 1, integer(1)  # micro-batches per step (batch_size must divide)
    # where AdamW's state lives between steps: device | host (pinned host memory: the step
    # copies it in before the update and out after; XLA:CPU's host is its device)
    train.optimizer_memory = "device", text(OPTIMIZER_MEMORIES)
    # a metrics line (and metrics.jsonl row) every this many steps
    train.log_every_steps = 10, integer(1)
    train.stop_at_step = 0, integer(0)  # >0: checkpoint and exit after this step (resume later)
    # a step whose loss or gradients are not finite is skipped (nothing updated); after
    # this many in a row the run stops (its checkpoints are all from finite states)
    train.max_skipped_steps = 10, integer(1)
    # a workdir whose newest checkpoint's parameters start this run (fresh optimizer; used
    # for fine-tuning, e.g. at a longer length with a RoPE scaling); "" = random init
    train.init_from = "", text()
    # resuming with another train.steps, learning rate, warmup, floor, curriculum.shares or
    # lr_multipliers is refused unless this is True; then the rate continues from where the
    # run was and blends into the new schedule by its end (train/schedule.py)
    train.allow_schedule_change = False, flag()

    # --- length curriculum ------------------------------------------------------------
    curriculum = root.section("curriculum")
    # training length of level 0 (and the learned-position limit)
    curriculum.l_max = 1024, integer(1)
    curriculum.levels = 1, integer(1)  # K: level k trains at lengths[k] (default l_max * 2^k)
    # what the budget (train.steps x train.batch_size rows of l_max tokens) counts:
    # "tokens": every step has batch_size x l_max tokens (the batch halves when the length
    #   doubles), so token-driven lr schedules and the loss scale match across levels;
    # "sequences": every level keeps batch_size rows, so tokens per step grow with length.
    curriculum.unit = "tokens", text(CURRICULUM_UNITS)  # tokens | sequences
    # ascending: stages short to long; interleaved: levels mixed step by step in an order
    # drawn from config.seed (each level keeps its share of the steps).
    # ascending | interleaved
    curriculum.order = "ascending", text(CURRICULUM_ORDERS)
    # move devices from mesh.data to mesh.seq as the length grows (and the batch shrinks),
    # so every device keeps the same rows and local length; needs a sequence-parallel
    # model.attention (ring, ulysses, allgather, hybrid).
    curriculum.relayout = True, flag()
    # budget share per level, positive, summing to 1. None: 2^-(k+1), the last level also
    # takes the remainder (K=4: 0.5, 0.25, 0.125, 0.125).
    curriculum.shares = None, items(number(above=0), optional=True)
    # training length per level, increasing, lengths[0] == l_max. None: l_max * 2^k.
    curriculum.lengths = None, items(integer(1), optional=True)
    # RoPE base per level (staged recipes raise it with the length). None: model.rope.theta.
    curriculum.rope_thetas = None, items(number(above=0), optional=True)
    # RoPE scaling per level: each None or a HF rope_scaling dict / JSON string.
    # None: model.rope.scaling at every level.
    curriculum.rope_scalings = None, items(anything(), optional=True)
    # learning-rate multiplier per level (applied on top of the schedule). None: 1.0 each.
    curriculum.lr_multipliers = None, items(number(above=0), optional=True)

    # --- device mesh ------------------------------------------------------------------
    mesh = root.section("mesh")
    mesh.data = -1, integer(1, also=(-1,))  # -1: the devices the other axes leave
    # parameters and optimizer state sharded over this axis (rows too)
    mesh.fsdp = 1, integer(1, also=(-1,))
    # every sequence split over this axis (sequence parallelism)
    mesh.seq = 1, integer(1, also=(-1,))
    mesh.tensor = 1, integer(1, also=(-1,))  # heads and MLP width split over this axis
    # token order along the seq axis: zigzag balances causal work (ring, allgather; the
    # hybrid's groups), contiguous keeps sequence order (ulysses; a sliding window's
    # shorter ring); auto: what model.attention needs
    mesh.layout = "auto", text(LAYOUT_SETTINGS)  # auto | zigzag | contiguous

    # --- checkpoints ------------------------------------------------------------------
    checkpoint = root.section("checkpoint")
    # an Orbax checkpoint every this many steps (and at the end)
    checkpoint.every_steps = 200, integer(1)
    checkpoint.max_to_keep = 3, integer(1)  # newest checkpoints kept
    # write checkpoints in the background while training goes on
    checkpoint.async_save = True, flag()

    # --- evaluation -------------------------------------------------------------------
    evaluation = root.section("eval")
    evaluation.name = "", plain_name()  # results go to eval/<name>/ (side by side); "" = eval/
    # >0: also evaluate every N steps during training, perplexity by length only (the
    # sliding window and the retrieval grid run at the end); 0: only at the end
    evaluation.every_steps = 0, integer(0)
    # None: powers of two from l_max/2 up to the longest that the eval mesh fits (probed by
    # compiling the scoring step), that eval.batch_size validation documents are long enough
    # for, and that is <= eval.max_length; never below 8 l_max.
    evaluation.lengths = None, items(integer(1), optional=True, nonempty=True)
    evaluation.max_length = 0, integer(0)  # cap on the default lengths (0: none)
    # per device, for that probe (0: the device's memory;
    evaluation.memory_budget_mib = 0.0, number(0)
                                       # CPU: host memory / local devices)
    evaluation.batch_size = 8, integer(1)
    # same-target windows: at most max_batches x batch_size documents
    evaluation.max_batches = 16, integer(1)
    # targets scored per window (0: the shortest length)
    evaluation.score_tokens = 0, integer(0)
    evaluation.sliding_stride = 256, integer(0)  # sliding-window protocol (0: off)
    # windows per length in the sliding-window protocol
    evaluation.sliding_max_windows = 64, integer(1)
    # Evaluate under another RoPE: None = the model's own; "none" = no scaling; or a Hugging
    # Face rope_scaling dict as JSON, e.g. '{"rope_type": "yarn", "factor": 4}'.
    evaluation.rope_scaling = None, anything()
    evaluation.rope_theta = 0.0, number(0)  # 0: the model's own
    # e.g. ("passkey", "kv", "line"); () = no retrieval grid
    evaluation.retrieval_tasks = (), items(text(RETRIEVAL_TASKS))
    # None or (): the eval lengths
    evaluation.retrieval_lengths = None, items(integer(1), optional=True)
    evaluation.retrieval_samples = 2, integer(1)  # samples per (depth, length) cell
    # k_max: longest length up to which every length has mean accuracy >= this (the
    # Position Interpolation paper's passkey criterion is 20%)
    evaluation.retrieval_threshold = 0.2, number(0, 1)
    # Retrieval exact match: "teacher_forced" (every answer token is the argmax given the
    # true prefix) or "generate" (greedy decoding of the prompt, on one device, yields the
    # answer ids); the answer log-probability is teacher-forced either way.
    evaluation.retrieval_scoring = "teacher_forced", text(SCORING_MODES)
    eval_data = evaluation.section("data")
    # Score another corpus than the run's (with the run's tokenizer): set source (and path,
    # text_field; validation_percent -1 = the run's) and eval.name; its results go to
    # eval/<name>/. "": the run's own data section.
    eval_data.source = "", text(("",) + SOURCES)
    eval_data.path = "", text()  # its glob of files
    eval_data.text_field = "text", text()  # its JSONL key / Parquet column
    # its share held out; -1: the run's data.validation_percent
    eval_data.validation_percent = -1, number(-1, 100)
    ruler = evaluation.section("ruler")
    # RULER (evaluation/ruler.py) by length, scored by greedy generation: tasks e.g.
    # ("niah_single_1", "vt"); ("all",) = the 11 synthetic tasks (+ qa_1, qa_2 when qa_path
    # is given); () = off. Essay haystacks are the run's validation documents.
    ruler.tasks = (), items(text(RULER_TASKS + ("all",)))
    ruler.lengths = None, items(integer(1), optional=True)  # None or (): the eval lengths
    ruler.samples = 4, integer(1)  # per task and length
    # effective length: longest L with mean score > threshold at L and every shorter length
    ruler.threshold = 85.6, number(0, 100)
    ruler.seed = 0, integer(0)  # samples are deterministic in (seed, task, length, index)
    ruler.qa_path = "", text()  # local SQuAD (qa_1) / HotpotQA (qa_2) JSON; "": qa skipped

    # --- generation (--mode generate) -------------------------------------------------
    generate = root.section("generate")
    generate.prompt = "", text()  # text, encoded with data.tokenizer
    generate.max_new_tokens = 64, integer(1)  # at most this many new tokens
    generate.temperature = 0.0, number(0)  # 0: greedy (top_p unused); > 0: sampling
    # nucleus: sample from the most likely tokens of this mass
    generate.top_p = 1.0, number(above=0, high=1)
    generate.seed = 0, integer(0)  # jax.random seed of the sampling
    generate.output = "", text()  # JSON file {"prompt_ids", "output_ids", "text"}; "": none
    # token ids that end generation (--mode import sets them from the checkpoint's
    # generation_config.json / config.json eos_token_id); (): generate max_new_tokens
    generate.eos_ids = (), items(integer(0))
    # the checkpoint's beginning-of-sequence and padding ids: --mode import records them
    # (generation_config.json, else config.json), --mode export writes them back with
    # eos_ids (config.json and generation_config.json); generation does not use them.
    # None: the checkpoint names none
    generate.bos_id = None, integer(0, optional=True)
    generate.pad_id = None, integer(0, optional=True)  # the padding id (see bos_id)
    # devices the prompt and the KV cache are split over (ring-attention prefill, decoding
    # over the split cache); 1: one device
    generate.seq = 1, integer(1)

    # --- lm-evaluation-harness (--mode lm_eval; cli/lm_eval_mode.py) -----------------
    lm_eval = root.section("lm_eval")
    # lm-eval task (or group) names, comma-separated, e.g. "ruler" or "my_mc,my_gen"
    lm_eval.tasks = "", text()
    # a directory of task YAMLs (local tasks, e.g. dataset_path: json with data_files);
    # "": lm-eval's own tasks only
    lm_eval.include_path = "", text()
    lm_eval.limit = 0, integer(0)  # > 0: at most this many documents per task; 0: all
    # few-shot examples per prompt; None: each task's own default
    lm_eval.num_fewshot = None, integer(0, optional=True)
    lm_eval.batch_size = 1, integer(1)  # requests scored (or generated) together
    # the window of a request: longer sequences keep their last max_length tokens; 0: the
    # trained length (the last curriculum level's). Beyond it, scoring and generation use
    # evaluation's RoPE settings (eval.rope_scaling) and say so in a notice.
    lm_eval.max_length = 0, integer(0)

    # --- ahead-of-time plan (--mode plan; cli/memory_plan.py) -------------------------------
    plan = root.section("plan")
    # cpu: this machine's devices; h100, a100, h200 (GPUs), v5e, v5p, v6e (TPU chips):
    # plan.devices compile-only devices of that accelerator, compiled by its own compiler
    # (parallel/targets.py; needs requirements-plan.txt, or the target's requirements file)
    plan.target = "cpu", text(TARGETS)
    # > 0: plan on this many devices: simulated CPU devices (cpu), GPUs or TPU chips (a
    # target; required there); 0: the real devices of this process
    plan.devices = 0, integer(0)
    # the longest-fit search: > 0: the longest length whose train step fits this many GiB
    # per device; 0: the target's memory (on cpu: no search); -1: no search
    plan.memory_budget_gib = 0.0, number(0, also=(-1,))
    # with mesh.seq > 1 at the last level: compile its step with each of these
    # sequence-parallel strategies and show them side by side (() = no comparison)
    plan.strategies = SEQUENCE_PARALLEL, items(text(SEQUENCE_PARALLEL))
    # link bandwidths the collective bytes are timed at, GB/s per device and direction:
    # within a host (NVLink; TPU: ICI); 0: the target's published figure (cpu: the h100's)
    plan.intra_host_gbps = 0.0, number(0)
    plan.inter_host_gbps = 0.0, number(0)  # across hosts (InfiniBand); 0: the target's

    # --- context extension (configs/extend.py; configs/extension.py) -----------------------
    # Position Interpolation: fine-tune the model of train.init_from at a longer length.
    # When target_length > 0 the trainer resolves, from the source workdir's config.json
    # (L0 = the longest length the source trained at): curriculum.l_max = target_length,
    # the RoPE scaling {"rope_type": "linear", "factor": target / L0} (yarn: also
    # "original_max_position_embeddings": L0), model.learned_positions_length = target for
    # learned positions, ring attention when mesh.seq > 1, and the warmup below.
    extend = root.section("extend")
    extend.target_length = 0, integer(0, also=(-1,))  # the new context length; 0: no extension
    # linear (Position Interpolation) | yarn
    extend.scaling = "linear", text(EXTEND_SCALINGS)
    # > 0: train.warmup_fraction = warmup_steps / train.steps
    extend.warmup_steps = 20, integer(0)
    return root.node


def check(config) -> None:
    """One ValueError line for the first key of `config` outside its declared rule."""
    if not RULES:
        get_config()
    rules.check(config, RULES)


def check_keys(keys) -> None:
    """One ValueError line for a --config.KEY that does not exist (every key is here),
    naming the closest existing one."""
    reference = get_config()
    for key in keys:
        node, done = reference, []
        for part in key.split("."):
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                siblings = list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
                close = difflib.get_close_matches(part, siblings, n=1)
                where = ".".join(done) or "the config"
                hint = f"; did you mean {'.'.join(done + close)}?" if close else ""
                raise ValueError(f"--config.{key}: {where} has no key {part!r}{hint}")
            node, done = node[part], done + [part]
