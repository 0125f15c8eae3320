"""Specification of the mesh: sharded training computes what one device computes."""
import jax
import numpy as np
import optax
import pytest

from model.loss import token_loss_sums
from parallel import mesh as mesh_lib
from tests.helpers import small_config
from train.state import build_run, init_state
from train.step import put_batch
from configs.sections import settings as settings_of


def random_batch(rows=8, length=64, seed=0):
    """Packed rows: 3 documents each, positions restarting per document."""
    rng = np.random.default_rng(seed)
    segments = np.repeat(np.array([1, 2, 3]), [20, 30, 14])[None].repeat(rows, 0)
    positions = np.concatenate([np.arange(20), np.arange(30), np.arange(14)])[None].repeat(rows, 0)
    return {"tokens": rng.integers(0, 256, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, 256, (rows, length)).astype(np.int32),
            "positions": positions.astype(np.int32), "segment_ids": segments.astype(np.int32),
            "loss_mask": (rng.random((rows, length)) > 0.1).astype(np.float32)}


def loss_and_grads(mesh_sizes, attention, devices):
    config = small_config(**{"model.attention": attention})
    config.mesh.update(mesh_sizes)
    run = build_run(settings_of(config), devices=devices)
    params = init_state(run, seed=0)["params"]
    batch = put_batch(random_batch(), run.mesh, 8, run.layout, run.layout_parts)

    def mean_loss(params):
        nll, count = token_loss_sums(run.graphdef, params, batch)
        return nll / count

    with mesh_lib.use_mesh(run.mesh):
        loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    return float(loss), {jax.tree_util.keystr(k): np.asarray(v)
                         for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.fixture(scope="module")
def one_device_reference():
    return loss_and_grads(dict(data=1, fsdp=1, seq=1, tensor=1), "blockwise", jax.devices()[:1])


@pytest.mark.parametrize("mesh_sizes", [
    dict(data=1, fsdp=1, seq=8, tensor=1),
    dict(data=2, fsdp=1, seq=4, tensor=1),
    dict(data=1, fsdp=2, seq=2, tensor=2),
], ids=["seq8", "data2-seq4", "fsdp2-seq2-tensor2"])
@pytest.mark.slow
def test_sharded_loss_and_gradients_equal_one_device(one_device_reference, mesh_sizes):
    ref_loss, ref_grads = one_device_reference
    loss, grads = loss_and_grads(mesh_sizes, "ring", jax.devices())
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        err = np.linalg.norm(grads[name] - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err <= 1e-5, (name, err)


@pytest.mark.slow
def test_parameters_are_created_sharded_over_fsdp_seq_and_tensor():
    config = small_config(**{"model.attention": "ring"})
    config.mesh.update(dict(data=1, fsdp=2, seq=2, tensor=2))
    run = build_run(settings_of(config))
    state = init_state(run, seed=0)
    # the blocks are stacked: [layers, d_model, heads, head_dim]
    wq = state["params"]["blocks"]["attention"]["wq"][...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "seq"), "tensor", None)
    # each device holds every layer, a quarter of d_model rows and half of the heads
    assert wq.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
    # Adam's first moment of wq is sharded like wq
    adam_mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    adam_mu = adam_mu["blocks"]["attention"]["wq"][...]
    assert adam_mu.sharding.spec == wq.sharding.spec
    assert len({s.data.shape for s in adam_mu.addressable_shards}) == 1
    assert adam_mu.addressable_shards[0].data.size < adam_mu.size


def test_mesh_sizes_that_do_not_match_the_devices_are_a_clear_error():
    with pytest.raises(ValueError, match="8 devices are not a multiple"):
        mesh_lib.mesh_shape(dict(data=-1, fsdp=1, seq=3, tensor=1), 8)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        mesh_lib.mesh_shape(dict(data=1, fsdp=1, seq=4, tensor=1), 8)


def test_minus_one_fills_the_remaining_devices():
    assert mesh_lib.mesh_shape(dict(data=-1, fsdp=1, seq=4, tensor=1), 8)["data"] == 2
