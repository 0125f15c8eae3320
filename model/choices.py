"""The names the model's settings choose from (and how a model.remat value reads), in a
module that imports nothing, so that configs/base.py states its rules with these very
tuples before jax is imported."""

POSITION_KINDS = ("rope", "learned", "none")
# model.attention names whose function splits the sequence over a mesh (parallel/
# sequence_parallel.py builds them; the model itself only knows the names)
SEQUENCE_PARALLEL = ("ring", "ulysses", "allgather", "hybrid")
ATTENTION_KINDS = ("dense", "blockwise") + SEQUENCE_PARALLEL
DTYPES = ("float32", "bfloat16", "float16")            # of activations and of parameters
NORM_KINDS = ("rmsnorm", "layernorm")
MLP_KINDS = ("swiglu", "gelu_tanh")
LAYER_TYPES = ("sliding_attention", "full_attention")   # per layer: the window, or none
REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out", "offload",
                  "offload_attention")
OFFLOAD_POLICIES = ("offload", "offload_attention")   # these need scanned layers


def policy_name(value) -> str:
    """The policy a model.remat value names (bools from older configs accepted)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {value!r}")
    return value
