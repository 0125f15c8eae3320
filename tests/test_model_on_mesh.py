"""parallel/model_on_mesh.py: the one abstract builder of a model on a mesh gives the shapes
and shardings the real model has, and the decoding config every generator uses."""
import dataclasses

import jax
import pytest
from flax import nnx

from model.transformer import ModelConfig, Transformer
from parallel import mesh as mesh_lib
from parallel.model_on_mesh import abstract_model, decoding_config

CONFIG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2, head_dim=8,
                     mlp_dim=64, l_max=32, dtype="float32", block_q=8, block_k=8,
                     attention="blockwise", remat="full")


def test_the_abstract_model_has_the_built_models_shapes_and_shardings():
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "seq": 2, "tensor": 2})
    graphdef, params, shardings = abstract_model(CONFIG, mesh)
    with mesh_lib.use_mesh(mesh):
        built = nnx.state(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)

    def leaves(tree):
        return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves(params))   # nothing allocated
    assert [(x.shape, x.dtype) for x in leaves(params)] == [(x.shape, x.dtype)
                                                            for x in leaves(built)]
    assert all(s.is_equivalent_to(x.sharding, len(x.shape))
               for s, x in zip(leaves(shardings), leaves(built), strict=True))
    assert any("tensor" in str(s.spec) for s in leaves(shardings))   # the logical axes mapped
    assert all(s.mesh == mesh for s in leaves(shardings))
    model = nnx.merge(graphdef, built)
    assert model.cfg == CONFIG


@pytest.mark.parametrize("attention, decoded", [("ring", "dense"), ("ulysses", "dense"),
                                                ("blockwise", "blockwise"), ("dense", "dense")])
def test_decoding_attends_over_the_cache_without_sequence_parallel_attention_or_remat(
        attention, decoded):
    config = decoding_config(dataclasses.replace(CONFIG, attention=attention))
    assert (config.attention, config.remat) == (decoded, "none")
    assert dataclasses.replace(config, attention=attention, remat="full") == dataclasses.replace(
        CONFIG, attention=attention)
