"""Hugging Face checkpoints in and out: the only module that knows Hugging Face names.

- `load_config(hf_dir)`: config.json -> (ModelConfig, architecture), or one ValueError line
  naming what was found and what is supported.
- `load_params(hf_dir, abstract_params, shardings)` (and `load_model(hf_dir, ...)`, the
  same on one device): config.json + model.safetensors (or a sharded
  model.safetensors.index.json) -> parameters (a Transformer), streamed tensor by tensor:
  every parameter is built with `jax.make_array_from_callback`, and each callback reads
  from the file only the rows of the checkpoint tensor its device's block needs (positioned
  reads, no memory map: see _SafetensorsFile), then transposes / reshapes it into our
  layout. The host never holds the checkpoint besides the model: one block at a time.
- `save_model(model, out_dir, ...)`: the inverse; config.json in the style the installed
  transformers (5.x) writes (`rope_parameters`), model.safetensors sharded above
  `max_shard_bytes` with model.safetensors.index.json, tokenizer.json copied when given,
  the bos/eos/pad ids in config.json and generation_config.json.
- `compute_dtype(hf_dir)`, `special_token_ids(hf_dir)`: what --mode import keeps of a
  checkpoint besides its weights (the dtype it computes in; its bos/eos/pad ids).

Architectures: LlamaForCausalLM (Llama 2 / 3 / 3.1 / 3.2, rope types default, linear,
dynamic, yarn with DeepSeek's mscale keys, llama3, longrope), MistralForCausalLM (its
sliding window on every layer; 4096 when config.json names none, as transformers says),
Qwen2ForCausalLM (q/k/v biases; `use_sliding_window` with the window on the layers
`layer_types` or `max_window_layers` name), GPT2LMHeadModel (learned positions,
LayerNorm, tanh GELU, biases); a config.json without `architectures` is read by its
model_type (llama, mistral, qwen2, gpt2), as AutoModelForCausalLM does. q/k weights need no
permutation: our RoPE uses Hugging Face's rotate-half layout. Refused: any other
architecture, an unknown rope type, partial rotary embeddings, an activation other than silu
(SwiGLU) or tanh GELU (GPT-2), a width the heads do not divide (without head_dim), a tensor
no parameter comes from, a NaN / inf weight, a bos/eos/pad id outside the vocabulary.

Length: for RoPE models ModelConfig.l_max is the length the rope scaling is relative to
(the scaling's original_max_position_embeddings when given, else max_position_embeddings;
for "dynamic", Hugging Face always uses max_position_embeddings); for GPT-2 it is
n_positions (the rows of the position table).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from model import positions as pos_lib
from model.choices import DTYPES
from model.transformer import ModelConfig, Transformer
from util.errors import first_line

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")
_ROPE_ARCHITECTURES = SUPPORTED[:3]
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


# --------------------------------------------------------------------------- config.json


def read_config_json(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    return _read_json(path)


def _read_json(path: str):
    """A JSON file's contents, or one ValueError line naming the file."""
    with open(path, "rb") as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as error:    # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({first_line(str(error), 120)})") \
            from None


def eos_token_ids(hf_dir: str) -> tuple[int, ...]:
    """The ids that end generation: `eos_token_id` of generation_config.json (what
    transformers' generate uses), else of config.json; an id or a list; () when none."""
    return _token_id_entries(hf_dir)["eos"][0]


_TOKEN_FILES = ("generation_config.json", "config.json")   # the first that names an id wins


def _token_id_entries(hf_dir: str) -> dict:
    """{"bos" / "eos" / "pad": (value, the file it came from or None)}: each from
    generation_config.json (what transformers' generate uses) when it names one, else from
    config.json; eos as a tuple of ids (() when none), bos and pad an id or None."""
    out = {"bos": (None, None), "eos": ((), None), "pad": (None, None)}
    for name in reversed(_TOKEN_FILES):                    # config.json first, then the winner
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        found = _json_object(path)
        eos = found.get("eos_token_id")
        if eos is not None:
            ids = np.atleast_1d(eos).tolist()
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"{path}: eos_token_id {eos!r} is not supported; supported: "
                                 "an integer id, a list of them, or null")
            out["eos"] = (tuple(ids), path)
        for key in ("bos", "pad"):
            value = found.get(f"{key}_token_id")
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{path}: {key}_token_id {value!r} is not supported; "
                                 "supported: one integer id or null")
            out[key] = (value, path)
    return out


def _json_object(path: str) -> dict:
    found = _read_json(path)
    if not isinstance(found, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(found).__name__}")
    return found


def special_token_ids(hf_dir: str, vocab_size: int | None = None) -> dict:
    """{"bos": id or None, "eos": (ids...), "pad": id or None} of a checkpoint: each from
    generation_config.json (what transformers' generate uses) when it names one, else from
    config.json. With `vocab_size`, an id outside [0, vocab_size) is one ValueError line
    naming the file, the key and the vocabulary size."""
    entries = _token_id_entries(hf_dir)
    if vocab_size is not None:
        for key in ("eos", "bos", "pad"):
            value, path = entries[key]
            for token in (value if key == "eos" else () if value is None else (value,)):
                if not 0 <= token < vocab_size:
                    shown = f"{token}" + (f" (of {list(value)})" if key == "eos" and
                                          len(value) > 1 else "")
                    raise ValueError(
                        f"{path}: {key}_token_id {shown} is outside the vocabulary "
                        f"(vocab_size {vocab_size}: ids 0 to {vocab_size - 1}); correct it "
                        "there (or set it to null) and import again")
    return {key: value for key, (value, _) in entries.items()}


# config.json's dtype names (`dtype` in transformers 5, `torch_dtype` before) that we compute in
_COMPUTE_DTYPES = DTYPES


def compute_dtype(hf_dir: str) -> tuple[str, str]:
    """(dtype, where it came from) for computing with a checkpoint: the dtype its
    config.json names (`dtype`, or `torch_dtype` of older transformers), else its tensors'.
    float32, bfloat16 and float16 are each kept (ModelConfig computes in all three)."""
    hf = read_config_json(hf_dir)
    for key in ("dtype", "torch_dtype"):
        named = hf.get(key)
        if isinstance(named, str) and named.removeprefix("torch.") in _COMPUTE_DTYPES:
            return named.removeprefix("torch."), f"the checkpoint's config.json {key}"
    return _checkpoint_dtype(hf_dir), "the checkpoint's tensors"


# config.json's model_type -> the architecture it names when `architectures` is missing
# (what transformers' AutoModelForCausalLM does with such a config.json)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _architecture(hf: dict) -> str:
    """The architecture config.json names: its one `architectures` entry, or without
    `architectures` the one its `model_type` names (as AutoModelForCausalLM reads it)."""
    found = hf.get("architectures")
    supported = f"supported: {', '.join(SUPPORTED)}"
    if not found:
        model_type = hf.get("model_type")
        if isinstance(model_type, str) and model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        types = ", ".join(_MODEL_TYPES)
        if model_type:
            raise ValueError(f"config.json has no `architectures`, and its model_type "
                             f"{model_type!r} is none of {types} (which name an architecture "
                             f"alone); {supported}")
        raise ValueError(f"config.json names neither `architectures` nor `model_type`; "
                         f"{supported} (or model_type {types})")
    if not isinstance(found, list) or len(found) != 1 or found[0] not in SUPPORTED:
        raise ValueError(f"unsupported Hugging Face architecture {found!r}; {supported}")
    return found[0]


def _head_dim(hf: dict, width_key: str, heads_key: str, has_head_dim: bool = True) -> int:
    """config.json's head_dim (`has_head_dim`: the architecture has that key), else
    width // heads when that divides (as transformers does); one ValueError line naming
    both keys when it does not."""
    width, heads = int(hf[width_key]), int(hf[heads_key])
    if has_head_dim and hf.get("head_dim"):
        return int(hf["head_dim"])
    if heads < 1 or width % heads:
        no_head_dim = ("config.json gives no head_dim" if has_head_dim
                       else "this architecture has no head_dim key")
        raise ValueError(f"{width_key} {width} is not divisible by {heads_key} {heads}, and "
                         f"{no_head_dim}: the attention heads do not split the model's width")
    return width // heads


def _rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(theta, the rope dict without theta) from either config style: `rope_parameters`
    (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    params = hf.get("rope_parameters")
    if params is not None:
        params = dict(params)
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"per-layer rope_parameters {sorted(params)} are not supported; "
                             "supported: one rope dict for every layer")
        theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    else:
        params = dict(hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", 10000.0)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported; supported: 1.0 "
                         "(RoPE on the whole head)")
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type not in pos_lib.ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: "
                         f"{', '.join(pos_lib.ROPE_TYPES)}")
    return float(theta), (params if rope_type != "default" else None)


def _rope_config(hf: dict) -> dict:
    """ModelConfig fields of a RoPE model's positions (theta, scaling, l_max)."""
    theta, scaling = _rope_settings(hf)
    max_positions = int(hf.get("max_position_embeddings") or 2048)
    if scaling is None:
        return dict(rope_theta=theta, rope_scaling_json="null", l_max=max_positions)
    scaling = dict(scaling)
    rope_type = scaling["rope_type"]
    if rope_type == "dynamic":   # Hugging Face: L0 is always max_position_embeddings
        scaling["original_max_position_embeddings"] = max_positions
    if rope_type in ("yarn", "llama3", "longrope"):
        # transformers: a top-level original_max_position_embeddings (Phi-3) wins, else the
        # dict's own, else max_position_embeddings
        if hf.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_positions)
    if rope_type in ("yarn", "longrope") and scaling.get("factor") is None:
        # transformers: the ratio of the extended to the original length
        scaling["factor"] = max_positions / scaling["original_max_position_embeddings"]
    if rope_type == "linear":
        scaling.pop("original_max_position_embeddings", None)
    l_max = int(scaling.get("original_max_position_embeddings") or max_positions)
    normalized = pos_lib.normalize_rope_scaling(scaling, original_max_position_embeddings=l_max)
    return dict(rope_theta=theta, rope_scaling_json=json.dumps(normalized, sort_keys=True),
                l_max=l_max)


# transformers' defaults when config.json names no window (MistralConfig, Qwen2Config)
_DEFAULT_WINDOW = 4096
_QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28


def _sliding_window(hf: dict, architecture: str, n_layers: int) -> dict:
    """ModelConfig fields of the sliding window (sliding_window, layer_types) as
    transformers reads them: Mistral's window on every layer; Qwen2's only with
    use_sliding_window, on the layers `layer_types` marks "sliding_attention" (default:
    those from max_window_layers on). Llama has none."""
    if architecture == "MistralForCausalLM":
        window, types = hf.get("sliding_window", _DEFAULT_WINDOW), None
    elif architecture == "Qwen2ForCausalLM":
        window = hf.get("sliding_window", _DEFAULT_WINDOW) if hf.get("use_sliding_window") \
            else None
        types = hf.get("layer_types")
        if types is None and window is not None:
            first = hf.get("max_window_layers", _QWEN2_DEFAULT_MAX_WINDOW_LAYERS)
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(n_layers)]
    else:
        return dict(sliding_window=None, layer_types=None)
    if window is None:
        return dict(sliding_window=None, layer_types=None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window {window!r} is not valid; supported: null or an "
                         "integer >= 1 (tokens)")
    if types is not None:
        types = tuple(types)
        if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types {list(types)} is not supported; supported: one of "
                             "full_attention / sliding_attention per layer")
        if "sliding_attention" not in types:
            return dict(sliding_window=None, layer_types=None)
        if "full_attention" not in types:
            types = None
    return dict(sliding_window=int(window), layer_types=types)


def load_config(hf_dir: str) -> tuple[ModelConfig, str]:
    """(ModelConfig, architecture) of a Hugging Face model directory.

    The ModelConfig has the checkpoint's parameter dtype, float32 compute and blockwise
    attention; `load_model` replaces those with its arguments.
    """
    hf = read_config_json(hf_dir)
    architecture = _architecture(hf)
    common = dict(vocab_size=int(hf["vocab_size"]), dtype="float32", param_dtype="float32",
                  attention="blockwise")
    if architecture == "GPT2LMHeadModel":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in _GPT2_ACTIVATIONS:
            raise ValueError(f"GPT-2 activation_function {activation!r} is not supported; "
                             f"supported: {', '.join(_GPT2_ACTIVATIONS)} (tanh GELU)")
        for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False),
                         ("add_cross_attention", True)):
            if hf.get(key, not bad) == bad:
                raise ValueError(f"GPT-2 {key}={bad} is not supported; supported: {not bad}")
        d_model, heads = int(hf["n_embd"]), int(hf["n_head"])
        head_dim = _head_dim(hf, "n_embd", "n_head", has_head_dim=False)
        config = ModelConfig(
            d_model=d_model, n_layers=int(hf["n_layer"]), q_heads=heads, kv_heads=heads,
            head_dim=head_dim, mlp_dim=int(hf.get("n_inner") or 4 * d_model),
            l_max=int(hf["n_positions"]), position="learned",
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), norm="layernorm",
            mlp="gelu_tanh", qkv_bias=True, attention_out_bias=True, mlp_bias=True, **common)
    else:
        activation = hf.get("hidden_act", "silu")
        if activation != "silu":
            raise ValueError(f"hidden_act {activation!r} is not supported for {architecture}; "
                             "supported: silu (SwiGLU)")
        heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if architecture == "Qwen2ForCausalLM" else attention_bias
        config = ModelConfig(
            d_model=d_model, n_layers=int(hf["num_hidden_layers"]), q_heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=_head_dim(hf, "hidden_size", "num_attention_heads"),
            mlp_dim=int(hf["intermediate_size"]), position="rope",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm="rmsnorm", mlp="swiglu",
            qkv_bias=qkv_bias, attention_out_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)), **_rope_config(hf),
            **_sliding_window(hf, architecture, int(hf["num_hidden_layers"])), **common)
    config = dataclasses.replace(config, param_dtype=_checkpoint_dtype(hf_dir))
    config.validate()
    return config, architecture


# --------------------------------------------------------------------------- tensor mapping


@dataclasses.dataclass(frozen=True)
class Source:
    """How one of our parameters comes from one checkpoint tensor `key`:
    take [start, start + length) of HF axis `part_axis` (GPT-2's packed q|k|v), split HF axis
    `split_axis` into `split` (e.g. q_heads * head_dim -> (q_heads, head_dim); the inner
    part is never sharded), then transpose by `perm` (ours[i] = reshaped[perm[i]])."""
    key: str
    perm: tuple[int, ...] = ()
    split_axis: int | None = None
    split: tuple[int, int] | None = None
    part_axis: int | None = None
    part_start: int = 0


def _llama_sources(cfg: ModelConfig) -> dict[str, Source]:
    """Our parameter path -> Source, for Llama / Mistral / Qwen2 (prefix "model.")."""
    q, kv, hd = cfg.q_heads, cfg.kv_heads, cfg.head_dim
    out = {"embedding": Source("model.embed_tokens.weight"),
           "final_norm/scale": Source("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["lm_head"] = Source("lm_head.weight", perm=(1, 0))

    def layer(i: int) -> dict[str, Source]:
        p = f"model.layers.{i}."
        sources = {
            "attention_norm/scale": Source(p + "input_layernorm.weight"),
            "mlp_norm/scale": Source(p + "post_attention_layernorm.weight"),
            # q_proj [q*hd, d] -> [q, hd, d] -> wq [d, q, hd]
            "attention/wq": Source(p + "self_attn.q_proj.weight", (2, 0, 1), 0, (q, hd)),
            "attention/wk": Source(p + "self_attn.k_proj.weight", (2, 0, 1), 0, (kv, hd)),
            "attention/wv": Source(p + "self_attn.v_proj.weight", (2, 0, 1), 0, (kv, hd)),
            # o_proj [d, q*hd] -> [d, q, hd] -> wo [q, hd, d]
            "attention/wo": Source(p + "self_attn.o_proj.weight", (1, 2, 0), 1, (q, hd)),
            "mlp/w_gate": Source(p + "mlp.gate_proj.weight", (1, 0)),
            "mlp/w_up": Source(p + "mlp.up_proj.weight", (1, 0)),
            "mlp/w_down": Source(p + "mlp.down_proj.weight", (1, 0)),
        }
        if cfg.qkv_bias:
            for name, heads in (("q", q), ("k", kv), ("v", kv)):
                sources[f"attention/{name}_bias"] = Source(
                    p + f"self_attn.{name}_proj.bias", (0, 1), 0, (heads, hd))
        if cfg.attention_out_bias:
            sources["attention/out_bias"] = Source(p + "self_attn.o_proj.bias")
        if cfg.mlp_bias:
            for name in ("gate", "up", "down"):
                sources[f"mlp/{name}_bias"] = Source(p + f"mlp.{name}_proj.bias")
        return sources

    return {**out, **_stacked(layer, cfg.n_layers)}


def _gpt2_sources(cfg: ModelConfig, prefix: str) -> dict[str, Source]:
    """GPT-2: Conv1D weights are [in, out]; c_attn packs q | k | v along the output axis."""
    h, hd, d = cfg.q_heads, cfg.head_dim, cfg.d_model
    out = {"embedding": Source(prefix + "wte.weight"),
           "position_table": Source(prefix + "wpe.weight"),
           "final_norm/scale": Source(prefix + "ln_f.weight"),
           "final_norm/bias": Source(prefix + "ln_f.bias")}
    if not cfg.tie_embeddings:
        out["lm_head"] = Source("lm_head.weight", perm=(1, 0))

    def layer(i: int) -> dict[str, Source]:
        p = f"{prefix}h.{i}."
        sources = {
            "attention_norm/scale": Source(p + "ln_1.weight"),
            "attention_norm/bias": Source(p + "ln_1.bias"),
            "mlp_norm/scale": Source(p + "ln_2.weight"),
            "mlp_norm/bias": Source(p + "ln_2.bias"),
            # c_proj [h*hd, d] -> wo [h, hd, d]
            "attention/wo": Source(p + "attn.c_proj.weight", (0, 1, 2), 0, (h, hd)),
            "attention/out_bias": Source(p + "attn.c_proj.bias"),
            "mlp/w_in": Source(p + "mlp.c_fc.weight"),
            "mlp/in_bias": Source(p + "mlp.c_fc.bias"),
            "mlp/w_out": Source(p + "mlp.c_proj.weight"),
            "mlp/out_bias": Source(p + "mlp.c_proj.bias"),
        }
        for j, name in enumerate("qkv"):
            # c_attn [d, 3d]: columns [j*d, (j+1)*d) -> [d, h, hd]
            sources[f"attention/w{name}"] = Source(p + "attn.c_attn.weight", (0, 1, 2), 1, (h, hd),
                                                   part_axis=1, part_start=j * d)
            sources[f"attention/{name}_bias"] = Source(p + "attn.c_attn.bias", (0, 1), 0, (h, hd),
                                                       part_axis=0, part_start=j * d)
        return sources

    return {**out, **_stacked(layer, cfg.n_layers)}


def _stacked(layer: Callable[[int], dict[str, Source]], n_layers: int) -> dict[str, tuple]:
    """"blocks/<name>" -> the Source of each layer: our block parameters are stacked
    [n_layers, ...] (model/transformer.py), slice i comes from layer i's tensor."""
    layers = [layer(i) for i in range(n_layers)]
    return {f"blocks/{name}": tuple(sources[name] for sources in layers) for name in layers[0]}


def _sources(cfg: ModelConfig, architecture: str, keys) -> dict[str, Source | tuple]:
    """Our parameter path -> its Source, or for a stacked block parameter a tuple of one
    Source per layer."""
    if architecture == "GPT2LMHeadModel":
        prefix = "transformer." if "transformer.wte.weight" in keys else ""
        return _gpt2_sources(cfg, prefix)
    return _llama_sources(cfg)


def _hf_index(source: Source, shape: tuple[int, ...], index: tuple[slice, ...]):
    """The slice of the checkpoint tensor that our block `index` (of our `shape`) needs, and
    the slice left to take of the reshaped/transposed block (for a partly selected inner
    split axis)."""
    ndim = len(shape)
    perm = source.perm or tuple(range(ndim))
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    reshaped = [None] * ndim
    for ours, theirs in enumerate(perm):
        reshaped[theirs] = index[ours]
    reshaped_shape = [0] * ndim
    for ours, theirs in enumerate(perm):
        reshaped_shape[theirs] = shape[ours]
    hf_index, rest = [], [slice(None)] * ndim
    axis = 0
    while axis < ndim:
        hf_axis = len(hf_index)
        if source.split_axis is not None and hf_axis == source.split_axis:
            outer, inner = reshaped[axis], reshaped[axis + 1]
            inner_size = reshaped_shape[axis + 1]
            hf_index.append(slice(outer.start * inner_size, outer.stop * inner_size))
            rest[axis + 1] = inner            # inner part read whole, cut afterwards
            axis += 2
        else:
            hf_index.append(reshaped[axis])
            axis += 1
    if source.part_axis is not None:
        s = hf_index[source.part_axis]
        hf_index[source.part_axis] = slice(s.start + source.part_start, s.stop + source.part_start)
    # `rest` is in reshaped order; bring it into ours.
    rest_ours = tuple(rest[theirs] for theirs in perm)
    return tuple(hf_index), rest_ours


def _to_ours(source: Source, block: np.ndarray) -> np.ndarray:
    if source.split_axis is not None:
        a = source.split_axis
        block = block.reshape(block.shape[:a] + (-1, source.split[1]) + block.shape[a + 1:])
    return np.transpose(block, source.perm) if source.perm else block


_NUMPY_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                 "BF16": np.dtype(jnp.bfloat16)}


class _SafetensorsFile:
    """One .safetensors file read with positioned reads (os.pread), not a memory map.

    `safe_open` maps the file, and every page it touches counts in the process's resident
    memory until the file is closed: importing a 1.2B-parameter bf16 checkpoint measured
    2.1x the checkpoint's size in maxrss, half of it mapped file pages. Reading only the
    bytes a block needs into a fresh array keeps the peak at the parameters plus one block.
    The format is an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}} and the row-major data.
    """

    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = _read_safetensors_header(path)
        self.fd = os.open(path, os.O_RDONLY)

    def close(self):
        os.close(self.fd)

    def keys(self):
        return self.header.keys()


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) of a .safetensors
    file; one ValueError line naming the file when it is not one (the header length is
    checked against the file's size before anything is read, so garbage never allocates)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than "
                             "the 8-byte header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{path}: not a safetensors file (its header length {length} "
                             f"exceeds the file's {size} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as error:    # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not a safetensors file (its {length}-byte header is not "
                         f"JSON: {first_line(str(error), 80)})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is a "
                         f"{type(header).__name__}, not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and
                all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]
                and isinstance(entry.get("shape"), list) and "dtype" in entry):
            raise ValueError(f"{path}: not a safetensors file (tensor {key!r} has no valid "
                             "dtype, shape and data_offsets)")
        if offsets[1] > data_size:
            raise ValueError(f"{path}: truncated: tensor {key!r} ends at byte {offsets[1]} of "
                             f"a data section of {data_size} bytes")
    return header, 8 + length


class _Tensor:
    """A tensor of a _SafetensorsFile: shape, dtype, and blocks read by slicing
    (the rows of axis 0 the block needs are read, the other axes cut in memory)."""

    def __init__(self, file: _SafetensorsFile, key: str):
        entry = file.header[key]
        self.file, self.key = file, key
        self.shape = tuple(entry["shape"])
        self.dtype_name = entry["dtype"]
        self.start = file.data_start + entry["data_offsets"][0]

    def get_shape(self):
        return list(self.shape)

    def get_dtype(self):
        return self.dtype_name

    def __getitem__(self, index) -> np.ndarray:
        if self.dtype_name not in _NUMPY_DTYPES:
            raise ValueError(f"{self.key}: checkpoint dtype {self.dtype_name} is not supported; "
                             f"supported: {', '.join(_NUMPY_DTYPES)}")
        dtype = _NUMPY_DTYPES[self.dtype_name]
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        if not self.shape:
            rows, rest = None, ()
        else:
            rows, rest = slice(*index[0].indices(self.shape[0])[:2]), index[1:]
        row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        first, count = (0, 1) if rows is None else (rows.start, max(rows.stop - rows.start, 0))
        nbytes = count * row_items * dtype.itemsize
        out = _aligned_empty((count * row_items,), dtype)
        view, done = memoryview(out.view(np.uint8)), 0
        while done < nbytes:
            n = os.preadv(self.file.fd, [view[done:]],
                          self.start + first * row_items * dtype.itemsize + done)
            if n <= 0:
                raise ValueError(f"{self.file.path}: truncated tensor {self.key}")
            done += n
        out = out.reshape(((count,) if rows is not None else ()) + self.shape[1:])
        if rows is None:
            return out
        return out[(slice(None),) + rest] if any(s != slice(None) for s in rest) else out


_ALIGNMENT = 64   # XLA's CPU client adopts 64-byte aligned host buffers without a copy


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGNMENT, np.uint8)
    offset = (-buffer.ctypes.data) % _ALIGNMENT
    return buffer[offset:offset + nbytes].view(dtype).reshape(shape)


def _as_aligned(block: np.ndarray, dtype) -> np.ndarray:
    """`block` as a C-contiguous, 64-byte aligned array of `dtype` (itself if it is one):
    on CPU, jax then uses it as the device buffer instead of copying it."""
    dtype = np.dtype(dtype)
    if block.dtype == dtype and block.flags.c_contiguous and \
            block.ctypes.data % _ALIGNMENT == 0:
        return block
    out = _aligned_empty(block.shape, dtype)
    np.copyto(out, block, casting="unsafe")
    return out


class _Checkpoint(contextlib.ExitStack):
    """The safetensors files of a model directory (model.safetensors, or the files that
    model.safetensors.index.json names), opened lazily."""

    def __init__(self, hf_dir: str):
        super().__init__()
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index_path):
            weight_map = _json_object(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no weight_map object")
            self.files = weight_map
        elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            file = _SafetensorsFile(os.path.join(hf_dir, "model.safetensors"))
            self.callback(file.close)
            self._open = {"model.safetensors": file}
            self.files = {key: "model.safetensors" for key in file.keys()}
            return
        else:
            raise ValueError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors checkpoints are supported)")
        self._open = {}

    def slice(self, key: str) -> _Tensor:
        if key not in self.files:
            raise ValueError(f"{self.hf_dir}: the checkpoint has no tensor {key!r}")
        name = self.files[key]
        if name not in self._open:
            self._open[name] = _SafetensorsFile(os.path.join(self.hf_dir, name))
            self.callback(self._open[name].close)
        return _Tensor(self._open[name], key)


def _checkpoint_dtype(hf_dir: str) -> str:
    with _Checkpoint(hf_dir) as checkpoint:
        key = next((k for k in checkpoint.files
                    if k.endswith(("embed_tokens.weight", "wte.weight"))),
                   next(iter(checkpoint.files)))
        dtype = checkpoint.slice(key).get_dtype()
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"checkpoint dtype {dtype} is not supported; supported: "
                         f"{', '.join(_SAFETENSORS_DTYPES)}")
    return _SAFETENSORS_DTYPES[dtype]


# --------------------------------------------------------------------------- loading


def _path_name(path) -> str:
    return "/".join(str(key) for key in path)


def load_model(hf_dir: str, dtype: str = "float32", param_dtype: str | None = None,
               attention: str = "blockwise", attention_fn: Callable | None = None,
               **overrides) -> Transformer:
    """A Transformer with the weights of a Hugging Face checkpoint directory, on the first
    local device (sharded over a mesh: place the model with
    parallel/model_on_mesh.abstract_model and read the weights with load_params).

    Args:
      dtype: the compute dtype. param_dtype: the parameters' dtype (default: the
        checkpoint's). attention: dense | blockwise | ring (ring needs `attention_fn`).
      overrides: other ModelConfig fields (block_q, block_k, remat, ...).
    """
    config, architecture = load_config(hf_dir)
    config = dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype or config.param_dtype,
                                 attention=attention, **overrides)
    config.validate()
    with nnx.use_eager_sharding(False):
        graphdef, abstract_params = nnx.split(nnx.eval_shape(
            lambda: Transformer(config, rngs=nnx.Rngs(0), attention_fn=attention_fn)), nnx.Param)
    model = nnx.merge(graphdef, load_params(hf_dir, abstract_params))
    model.hf_architecture = architecture
    return model


def load_params(hf_dir: str, abstract_params, shardings=None) -> nnx.State:
    """The weights of a Hugging Face checkpoint directory as the parameters `abstract_params`
    describe (an nnx.State of a Transformer of load_config's shape, values ShapeDtypeStructs:
    their dtypes are kept). `shardings` (the same structure, NamedShardings; e.g.
    parallel/model_on_mesh.abstract_model's): every parameter is created sharded so, and
    each process reads only the slices its devices hold. None: on the first local device.
    A parameter the checkpoint lacks, or of another shape, a checkpoint tensor no parameter
    comes from (_check_no_unexpected_tensors), or a NaN / inf weight (checked block by block
    as it is read) is one ValueError line."""
    config, architecture = load_config(hf_dir)
    state = jax.tree.map(lambda x: x, abstract_params)      # filled below, the input kept
    flat_shardings = None
    if shardings is not None:
        flat_shardings = {_path_name(p): s.get_value() if isinstance(s, nnx.Variable) else s
                          for p, s in nnx.to_flat_state(shardings)}
    device_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    with _Checkpoint(hf_dir) as checkpoint:
        sources = _sources(config, architecture, checkpoint.files)
        _check_no_unexpected_tensors(hf_dir, checkpoint.files, sources, config, architecture)
        flat = nnx.to_flat_state(state)
        names = {_path_name(path) for path, _ in flat}
        if names != set(sources):
            raise AssertionError(f"parameter mapping out of date: {sorted(names ^ set(sources))}")
        for path, variable in flat:
            name = _path_name(path)
            shape, target_dtype = tuple(variable.shape), jnp.dtype(variable.dtype)
            stacked = isinstance(sources[name], tuple)
            layer_sources = sources[name] if stacked else (sources[name],)
            layer_shape = shape[1:] if stacked else shape
            tensors = [checkpoint.slice(source.key) for source in layer_sources]
            for source, tensor in zip(layer_sources, tensors):
                expected = _expected_hf_shape(source, layer_shape, tensor.get_shape())
                if tuple(tensor.get_shape()) != expected:
                    raise ValueError(f"{source.key}: checkpoint shape {tuple(tensor.get_shape())}, "
                                     f"config.json implies {expected}")

            def read(index, layer_sources=layer_sources, tensors=tensors, shape=shape,
                     layer_shape=layer_shape, stacked=stacked, target_dtype=target_dtype):
                if not stacked:
                    return _as_aligned(_read_block(layer_sources[0], tensors[0], layer_shape,
                                                   index), target_dtype)
                # one layer's block at a time into the (aligned) stacked block
                layers = range(*index[0].indices(shape[0]))
                block_shape = tuple(len(range(*i.indices(n)))
                                    for i, n in zip(index, shape))
                out = _aligned_empty(block_shape, target_dtype)
                for row, layer in enumerate(layers):
                    out[row] = _read_block(layer_sources[layer], tensors[layer], layer_shape,
                                           index[1:])
                return out

            sharding = flat_shardings[name] if flat_shardings else device_sharding
            variable.set_value(jax.make_array_from_callback(shape, sharding, read))
    return state


# Buffers that transformers recomputes rather than loads: a checkpoint may hold them, and
# they are no weights (older Llamas' rotary frequencies, GPT-2's causal mask).
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)h\.\d+\.attn\.(masked_)?bias$")
_LISTED = 5     # tensor names an error line lists before "and N more"


def _check_no_unexpected_tensors(hf_dir: str, keys, sources: dict, config: ModelConfig,
                                 architecture: str) -> None:
    """One ValueError line listing the checkpoint's tensors that no parameter comes from
    (buffers transformers recomputes excepted): weights the import would silently drop,
    e.g. a config.json that names fewer layers than the checkpoint holds."""
    mapped = {one.key for source in sources.values()
              for one in (source if isinstance(source, tuple) else (source,))}
    unexpected = sorted((k for k in keys if k not in mapped and not _IGNORED_TENSORS.search(k)),
                        key=_natural)
    if not unexpected:
        return
    shown = ", ".join(repr(k) for k in unexpected[:_LISTED])
    more = f" and {len(unexpected) - _LISTED} more" if len(unexpected) > _LISTED else ""
    hint = (" (config.json ties the embeddings, so lm_head.weight is not read)"
            if "lm_head.weight" in unexpected and config.tie_embeddings else
            " (does config.json describe these weights? e.g. its layer count)")
    raise ValueError(f"{hf_dir}: the checkpoint holds {len(unexpected)} tensor"
                     f"{'s' if len(unexpected) != 1 else ''} that {architecture} as config.json "
                     f"describes has no place for: {shown}{more}{hint}")


def _natural(key: str):
    """Sort key: layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def _read_block(source: Source, tensor: _Tensor, shape, index) -> np.ndarray:
    """Our block `index` (of our parameter `shape`) read from the checkpoint tensor; one
    ValueError line naming the tensor when the block holds NaN or inf (checked on what is
    read anyway, so the weights are read once)."""
    hf_index, rest = _hf_index(source, shape, index)
    block = tensor[hf_index]
    if not np.isfinite(block).all():
        kinds = " and ".join(kind for kind, found in (("NaN", np.isnan(block).any()),
                                                      ("inf", np.isinf(block).any())) if found)
        raise ValueError(f"{tensor.file.path}: tensor {tensor.key!r} holds non-finite values "
                         f"({kinds}); the checkpoint's weights must be finite")
    return _to_ours(source, block)[rest]


def _expected_hf_shape(source: Source, shape, hf_shape) -> tuple[int, ...]:
    """The checkpoint tensor's shape that our `shape` implies (packed axes: the file's)."""
    perm = source.perm or tuple(range(len(shape)))
    reshaped = [0] * len(shape)
    for ours, theirs in enumerate(perm):
        reshaped[theirs] = shape[ours]
    if source.split_axis is not None:
        a = source.split_axis
        reshaped[a:a + 2] = [reshaped[a] * reshaped[a + 1]]
    if source.part_axis is not None:
        reshaped[source.part_axis] = hf_shape[source.part_axis]
    return tuple(reshaped)


# --------------------------------------------------------------------------- saving


def infer_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that computes what `cfg` computes, or ValueError."""
    gpt2 = (cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu_tanh"
            and cfg.qkv_bias and cfg.attention_out_bias and cfg.mlp_bias
            and cfg.q_heads == cfg.kv_heads and cfg.q_heads * cfg.head_dim == cfg.d_model)
    if gpt2:
        return "GPT2LMHeadModel"
    if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        if cfg.qkv_bias and not cfg.attention_out_bias and not cfg.mlp_bias:
            return "Qwen2ForCausalLM"
        if cfg.sliding_window is not None:
            if not (cfg.qkv_bias or cfg.attention_out_bias or cfg.mlp_bias) and \
                    cfg.layer_types is None:
                return "MistralForCausalLM"      # Llama has no window; Mistral on every layer
        elif cfg.qkv_bias == cfg.attention_out_bias:
            return "LlamaForCausalLM"
    raise ValueError(
        f"no Hugging Face architecture computes this model (position={cfg.position}, "
        f"norm={cfg.norm}, mlp={cfg.mlp}, qkv_bias={cfg.qkv_bias}, attention_out_bias="
        f"{cfg.attention_out_bias}, mlp_bias={cfg.mlp_bias}, sliding_window="
        f"{cfg.sliding_window}, layer_types={cfg.layer_types}); supported: Llama (rope, "
        "rmsnorm, swiglu, q/k/v and output biases both or neither, no window), Mistral (no "
        "biases, a window on every layer or none), Qwen2 (q/k/v biases only, any windows), "
        "GPT-2 (learned, layernorm, gelu_tanh, every bias)")


def _rope_parameters(cfg: ModelConfig) -> tuple[dict, int]:
    """(rope_parameters, max_position_embeddings) for config.json."""
    scaling = cfg.rope_scaling
    out = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if scaling is None:
        return out, cfg.l_max
    out.update({k: v for k, v in scaling.items() if v is not None})
    rope_type = scaling["rope_type"]
    l0 = scaling.get("original_max_position_embeddings") or cfg.l_max
    if rope_type == "dynamic":
        out.pop("original_max_position_embeddings", None)
        return out, l0
    if rope_type in ("yarn", "llama3", "longrope"):
        out["original_max_position_embeddings"] = l0
        return out, round(l0 * scaling["factor"])
    return out, cfg.l_max


def hf_config(cfg: ModelConfig, architecture: str, eos_token_ids=(), bos_token_id=None,
              pad_token_id=None) -> dict:
    """config.json for `cfg` as `architecture`, in transformers 5's style."""
    config = _hf_config(cfg, architecture)
    config.update(generation_config(eos_token_ids, bos_token_id, pad_token_id))
    return config


def generation_config(eos_token_ids=(), bos_token_id=None, pad_token_id=None) -> dict:
    """The special-token ids as config.json and generation_config.json name them
    (transformers' GenerationConfig fields): one eos id as an integer, several as a list."""
    eos = [int(i) for i in eos_token_ids]
    return {"bos_token_id": None if bos_token_id is None else int(bos_token_id),
            "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
            "pad_token_id": None if pad_token_id is None else int(pad_token_id)}


def _hf_config(cfg: ModelConfig, architecture: str) -> dict:
    torch_dtype = cfg.param_dtype
    if architecture == "GPT2LMHeadModel":
        return {
            "architectures": [architecture], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.q_heads,
            "n_inner": cfg.mlp_dim, "n_positions": cfg.l_max, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "dtype": torch_dtype}
    if cfg.position != "rope":
        raise ValueError(f"{architecture} needs model.position='rope', got {cfg.position!r}")
    rope, max_positions = _rope_parameters(cfg)
    out = {
        "architectures": [architecture], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.q_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.mlp_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": max_positions,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "dtype": torch_dtype}
    windows = cfg.layer_windows()
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    if architecture == "LlamaForCausalLM":
        if cfg.sliding_window is not None:
            raise ValueError("LlamaForCausalLM has no sliding window; export as "
                             "MistralForCausalLM or Qwen2ForCausalLM")
        out.update(model_type="llama", attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif architecture == "MistralForCausalLM":
        if cfg.qkv_bias or cfg.attention_out_bias or cfg.mlp_bias:
            raise ValueError("MistralForCausalLM has no biases; export as LlamaForCausalLM")
        if cfg.sliding_window is not None and "full_attention" in types:
            raise ValueError("MistralForCausalLM has one window for every layer; this model "
                             f"has layer_types {types}")
        out.update(model_type="mistral", sliding_window=cfg.sliding_window)
    elif architecture == "Qwen2ForCausalLM":
        if not cfg.qkv_bias or cfg.attention_out_bias or cfg.mlp_bias:
            raise ValueError("Qwen2ForCausalLM has q/k/v biases and no others")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        out.update(model_type="qwen2", use_sliding_window=bool(sliding),
                   sliding_window=cfg.sliding_window if sliding else None,
                   max_window_layers=sliding[0] if sliding else cfg.n_layers,
                   layer_types=types)
    else:
        raise ValueError(f"cannot export as {architecture!r}; supported: {', '.join(SUPPORTED)}")
    return out


def _from_ours(source: Source, value: np.ndarray) -> np.ndarray:
    """Our full parameter -> its (part of the) checkpoint tensor."""
    if source.perm:
        value = np.transpose(value, np.argsort(source.perm))
    if source.split_axis is not None:
        a = source.split_axis
        value = value.reshape(value.shape[:a] + (-1,) + value.shape[a + 2:])
    return value


def save_model(model: Transformer, out_dir: str, tokenizer_path: str | None = None,
               architecture: str | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, eos_token_ids=(),
               bos_token_id: int | None = None, pad_token_id: int | None = None) -> str:
    """Write `model` as a Hugging Face directory `transformers` loads (AutoModelForCausalLM).

    architecture: default the one the model was loaded from, else inferred from its config
    (LlamaForCausalLM for models trained here). The weights are written in the parameter
    dtype, one tensor gathered to the host at a time (from every process when the model
    spans several: each process calls save_model, process 0 writes), in shards of at most
    `max_shard_bytes` (with model.safetensors.index.json when there is more than one).
    `tokenizer_path`: a tokenizer.json, copied with the tokenizer_config.json and
    special_tokens_map.json beside it. `eos_token_ids` (none when empty), `bos_token_id`,
    `pad_token_id`: config.json's eos/bos/pad_token_id, and when any is given also a
    generation_config.json naming them (what transformers' generate reads).
    """
    cfg = model.cfg
    architecture = architecture or getattr(model, "hf_architecture", None) or \
        infer_architecture(cfg)
    config = hf_config(cfg, architecture, eos_token_ids, bos_token_id, pad_token_id)
    generation = generation_config(eos_token_ids, bos_token_id, pad_token_id)
    params = {_path_name(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    sources = _sources(cfg, architecture, {"transformer.wte.weight"})
    if set(params) != set(sources):
        raise AssertionError(f"parameter mapping out of date: {sorted(set(params) ^ set(sources))}")
    # checkpoint key -> (our parameter, layer or None, Source): several for GPT-2's packed
    # c_attn; the keys of a stacked parameter's layers follow each other
    by_key: dict[str, list[tuple[str, int | None, Source]]] = {}
    for name, source in sources.items():
        for layer, one in (enumerate(source) if isinstance(source, tuple) else [(None, source)]):
            by_key.setdefault(one.key, []).append((name, layer, one))
    # Every process takes part in gathering each tensor; process 0 writes the files.
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):
            if name.startswith("model") and name.endswith((".safetensors", ".index.json")) \
                    or name == "generation_config.json":
                os.remove(os.path.join(out_dir, name))
    # Shards are written as they fill (the host holds one shard at most), then renamed
    # model-0000i-of-0000n.safetensors once n is known.
    written: list[tuple[str, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        file = f"model-part-{len(written) + 1}.safetensors"
        if writer:
            save_file(current, os.path.join(out_dir, file), metadata={"format": "pt"})
        written.append((file, list(current)))
        current, size = {}, 0

    on_host = {}     # the parameter gathered last: a stacked one serves all its layers

    def value(name: str, layer: int | None) -> np.ndarray:
        if name not in on_host:
            on_host.clear()
            on_host[name] = _on_host(params[name][...])
        return on_host[name] if layer is None else on_host[name][layer]

    for key, parts in by_key.items():
        parts = sorted(parts, key=lambda part: part[2].part_start)
        pieces = [_from_ours(source, value(name, layer)) for name, layer, source in parts]
        tensor = pieces[0] if len(pieces) == 1 else \
            np.concatenate(pieces, axis=parts[0][2].part_axis)
        del pieces
        if current and size + tensor.nbytes > max_shard_bytes:
            flush()
        current[key] = np.ascontiguousarray(tensor)
        size += tensor.nbytes
        total += tensor.nbytes
    if current or not written:
        flush()
    if writer:
        files = _finish_shards(out_dir, written, total)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if any(v is not None for v in generation.values()):
            with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
                json.dump(generation, f, indent=2, sort_keys=True)
            files.append("generation_config.json")
        if tokenizer_path:
            files += _copy_tokenizer(tokenizer_path, out_dir)
        _ordinary_permissions(out_dir, files)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("boundless: hf.save_model done")
    return out_dir


def _on_host(array) -> np.ndarray:
    """A whole parameter as numpy on this host; gathered from every process when its
    shards live on several (a collective: every process must call it)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _finish_shards(out_dir: str, written: list[tuple[str, list[str]]], total: int) -> list[str]:
    """One file: model.safetensors; several: model-0000i-of-0000n + the index. Returns
    the names of the files."""
    if len(written) == 1:
        os.replace(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, "model.safetensors"))
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, (file, keys) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(out_dir, file), os.path.join(out_dir, final))
        weight_map.update({key: final for key in keys})
        files.append(final)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + ["model.safetensors.index.json"]


def _ordinary_permissions(out_dir: str, files: list[str]) -> None:
    """Give `files` the permissions config.json got from open(), the umask's: safetensors
    (0.8) writes its files 0600 whatever the umask, and a copied tokenizer keeps its
    source's mode; an export's files are alike."""
    mode = os.stat(os.path.join(out_dir, "config.json")).st_mode & 0o777
    for name in files:
        os.chmod(os.path.join(out_dir, name), mode)


# the files an export writes (save_model): --mode export --overwrite replaces only a
# directory that holds nothing else
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", *TOKENIZER_FILES)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_export_file(name: str) -> bool:
    """Whether save_model writes a file of this name."""
    return name in EXPORT_FILES or bool(_SHARD_FILE.fullmatch(name))


def _copy_tokenizer(tokenizer_path: str, out_dir: str) -> list[str]:
    """tokenizer.json, and the tokenizer_config.json / special_tokens_map.json beside it;
    without a tokenizer_config.json, one naming PreTrainedTokenizerFast (so AutoTokenizer
    reads the file as it is, adding no special tokens). Returns the names written."""
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    written = ["tokenizer.json"]
    source_dir = os.path.dirname(os.path.abspath(tokenizer_path))
    for name in TOKENIZER_FILES[1:]:
        if os.path.exists(os.path.join(source_dir, name)):
            shutil.copy(os.path.join(source_dir, name), os.path.join(out_dir, name))
            written.append(name)
    if not os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        written.append("tokenizer_config.json")
    return written
