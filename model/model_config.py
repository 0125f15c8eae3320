"""ModelConfig: everything that fixes the model's shapes and numerics, in a module that
imports no jax (configs/base.py takes its model defaults from it, before jax is imported).

Its fields are the one list of model settings: configs/base.py's model section declares a
key per field (with this default), train/state.py builds a ModelConfig from them by name,
and the workdir and Hugging Face code copy PARAMETER_FIELDS and COMPUTE_FIELDS.
"""
from __future__ import annotations

import dataclasses
import json

from model.choices import (ATTENTION_KINDS, DTYPES, LAYER_TYPES, MLP_KINDS, NORM_KINDS,
                           OFFLOAD_POLICIES, POSITION_KINDS, policy_name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shapes and numerics (hashable: it is static)."""
    vocab_size: int
    d_model: int
    n_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    l_max: int                     # training length; the learned-position table's rows
                                   # (model.learned_positions_length when set)
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling_json: str = "null"  # normalised HF rope_scaling dict, as JSON (hashable)
    attention: str = "blockwise"
    block_q: int = 256
    block_k: int = 256
    tie_embeddings: bool = True
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"            # model/remat.py: a policy of REMAT_POLICIES
    loss_chunk_tokens: int = 0     # model/loss.py: LM head + loss in chunks of this many
                                   # tokens per row (0: all logits at once)
    mlp_chunk_tokens: int = 0      # the MLP in chunks of this many tokens per row (0: whole)
    remat_group: int = 1           # layers rematerialised as one group (see _over_layers)
    scan_layers: bool = True       # lax.scan over the stacked layers (False: a Python loop)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    norm: str = "rmsnorm"          # rmsnorm (scale) | layernorm (scale and bias)
    mlp: str = "swiglu"            # swiglu | gelu_tanh
    qkv_bias: bool = False         # biases on the q, k, v projections
    attention_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False         # biases on the MLP's matrices
    sliding_window: int | None = None  # attend to at most this many tokens (itself included)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" (the window)
                                   # or "full_attention"; None: every layer has the window

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        if self.sliding_window is None:
            return (None,) * self.n_layers
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    @property
    def rope_scaling(self) -> dict | None:
        return json.loads(self.rope_scaling_json)

    def validate(self) -> None:
        """Raise ValueError (one clear line) for a configuration that cannot be built."""
        if self.position not in POSITION_KINDS:
            raise ValueError(f"model.position must be one of {POSITION_KINDS}, "
                             f"got {self.position!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"model.q_heads ({self.q_heads}) must be a multiple of "
                             f"model.kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even model.head_dim, got {self.head_dim}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got "
                             f"{self.attention!r}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"model.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        policy = policy_name(self.remat)
        if policy in OFFLOAD_POLICIES and not self.scan_layers:
            # compiled for 8 H100s, tiny's loop of layers kept its inputs on the device as
            # well (device temp +17%); the scanned layers move them (tests/test_targets.py)
            raise ValueError(f"model.remat={policy} needs model.scan_layers=True: only the "
                             "scanned layers move their inputs to host memory")
        if policy == "offload_attention" and self.remat_group != 1:
            raise ValueError("model.remat=offload_attention keeps every layer's attention "
                             "residuals in host memory: it takes model.remat_group=1, got "
                             f"{self.remat_group}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        for name in ("qkv_bias", "attention_out_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.remat_group < 1 or self.n_layers % self.remat_group:
            raise ValueError(f"model.remat_group ({self.remat_group}) must be a positive "
                             f"divisor of model.n_layers ({self.n_layers})")
        for name in ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads", "head_dim",
                     "mlp_dim", "l_max", "block_q", "block_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name} must be float32, bfloat16 or float16")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"model.sliding_window must be None or an integer >= 1 (tokens), "
                             f"got {window!r}")
        if self.layer_types is not None:
            if (len(self.layer_types) != self.n_layers
                    or set(self.layer_types) - set(LAYER_TYPES)):
                raise ValueError(f"model.layer_types must be None or one of {LAYER_TYPES} per "
                                 f"layer ({self.n_layers}), got {self.layer_types!r}")


# The fields that fix the parameters' shapes (a checkpoint holds exactly these), and those
# that fix what the model computes with its parameters beyond them
PARAMETER_FIELDS = ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads", "head_dim",
                    "mlp_dim", "position", "tie_embeddings", "norm", "mlp", "qkv_bias",
                    "attention_out_bias", "mlp_bias")
COMPUTE_FIELDS = ("norm_eps", "sliding_window", "layer_types")


def defaults() -> dict:
    """{field: default} of every ModelConfig field that has one."""
    return {field.name: field.default for field in dataclasses.fields(ModelConfig)
            if field.default is not dataclasses.MISSING}
