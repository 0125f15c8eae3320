"""ModelConfig's fields are the one list of model settings: configs/base.py declares a model
key for each (with ModelConfig's default), train/state.py builds a ModelConfig from those
keys by name, and the workdir's and Hugging Face's lists are ModelConfig's groups."""
import dataclasses

from configs import base, workdir_config
from model.model_config import COMPUTE_FIELDS, PARAMETER_FIELDS, ModelConfig, defaults
from train.state import model_config_from
from configs.sections import settings as settings_of

# fields the model section does not hold under their own name: state.py derives them
DERIVED = {"l_max": "curriculum.l_max (or model.learned_positions_length)",
           "rope_theta": "model.rope.theta", "rope_scaling_json": "model.rope.scaling"}


def test_every_model_field_is_a_model_key_with_modelconfigs_default():
    model = base.get_config().model
    for field in dataclasses.fields(ModelConfig):
        if field.name in DERIVED:
            continue
        assert field.name in model, f"ModelConfig.{field.name} has no model.{field.name} key"
        if field.default is not dataclasses.MISSING:
            assert model[field.name] == field.default, field.name
    assert model.rope.theta == defaults()["rope_theta"]


def test_the_model_keys_reach_modelconfig_by_name():
    """Each same-named key set to a value other than its default arrives as that value."""
    config = base.get_config()
    changed = {"d_model": 96, "n_layers": 2, "q_heads": 6, "kv_heads": 2, "head_dim": 16,
               "mlp_dim": 200, "attention": "dense", "block_q": 64, "block_k": 32,
               "tie_embeddings": False, "dtype": "float16", "param_dtype": "bfloat16",
               "loss_chunk_tokens": 64, "mlp_chunk_tokens": 32, "remat_group": 2,
               "scan_layers": False, "norm_eps": 1e-6, "init_std": 0.01, "norm": "layernorm",
               "mlp": "gelu_tanh", "qkv_bias": True, "attention_out_bias": True,
               "mlp_bias": True, "sliding_window": 8,
               "layer_types": ("sliding_attention", "full_attention"), "position": "learned",
               "remat": "full"}
    for key, value in changed.items():
        config.model[key] = value
    model_config = model_config_from(settings_of(config), vocab_size=300)
    same_named = [f.name for f in dataclasses.fields(ModelConfig)
                  if f.name not in DERIVED and f.name != "vocab_size"]
    assert sorted(same_named) == sorted(changed)      # the test covers every such field
    for key, value in changed.items():
        assert getattr(model_config, key) == value, key


def test_the_workdir_lists_are_modelconfigs_groups():
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(PARAMETER_FIELDS) | set(COMPUTE_FIELDS) <= names
    assert workdir_config.ADOPTED_MODEL_KEYS == PARAMETER_FIELDS + COMPUTE_FIELDS
    fixed = {key for key, _, _ in workdir_config._FIXED_BY_WORKDIR if key.startswith("model.")}
    assert {f"model.{name}" for name in PARAMETER_FIELDS} <= fixed
