"""Specification of parallel/collectives.py: collective bytes read from compiled HLO (loops
times their trip counts, the larger branch of a conditional, operand vs traffic), checked
on hand-made HLO and on compiled attention against a hand count, and the closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel.collectives import closed_form_bytes, collective_bytes, transfer_seconds
from parallel.mesh import make_mesh
from parallel.sequence_parallel import sequence_attention

HLO = """HloModule example

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,8]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(f)/shard_map/while/body/ppermute"}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%branch_a (x: f32[4]) -> f32[16] {
  %x = f32[4]{0} parameter(0)
  ROOT %ag = f32[16]{0} all-gather(%x), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
}

%branch_b (x: f32[4]) -> f32[16] {
  %x = f32[4]{0} parameter(0)
  ROOT %b = f32[16]{0} broadcast(%x), dimensions={}
}

ENTRY %main (a: f32[4,8], y: f32[4], k: s32[]) -> f32[16] {
  %a = f32[4,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %a2a = bf16[4,8]{1,0} all-to-all(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[2]{0} reduce-scatter(%y), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %c = f32[16]{0} conditional(%k, %y, %y), branch_computations={%branch_a, %branch_b}
}
"""  # noqa: E501 - HLO instructions one per line, as XLA prints them


def test_hand_made_hlo_counts_loops_branches_operands_and_traffic():
    got = collective_bytes(HLO)
    assert got["collective-permute"] == 3 * 4 * 8 * 4          # 3 trips of 128 bytes
    assert got["all-gather"] == 16                              # the larger branch; operand f32[4]
    assert got["all-to-all"] == 4 * 8 * 2                       # bf16
    assert got["reduce-scatter"] == 2 * 4 * 4                   # operand = group x result
    assert got["traffic"] == 384 + 16 * 3 + 64 * 3 // 4 + 32 * 3 // 4
    assert got["attention_traffic"] == 384                      # only the one in a shard_map


def ring_and_ulysses_traffic():
    mesh = make_mesh(dict(data=1, fsdp=1, seq=8, tensor=1), jax.devices())
    sharding = NamedSharding(mesh, P(None, "seq", None, None))
    rows = NamedSharding(mesh, P(None, "seq"))
    q = jax.ShapeDtypeStruct((1, 1024, 8, 16), jnp.float32, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 16), jnp.float32, sharding=sharding)
    ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32, sharding=rows)
    out = {}
    for strategy in ("ring", "ulysses"):
        fn = jax.jit(lambda q, k, v, p, s: sequence_attention(
            q, k, v, mesh=mesh, strategy=strategy, positions=p, segment_ids=s, block_q=64,
            block_k=64))
        out[strategy] = collective_bytes(fn.lower(q, kv, kv, ids, ids).compile().as_text())
    return out


def test_compiled_attention_sends_what_a_hand_count_says():
    traffic = ring_and_ulysses_traffic()
    # ring, forward: 7 hops of K and V (128 tokens x 2 heads x 16, float32) and of the
    # positions and segment ids (128 int32 each)
    assert traffic["ring"]["attention_traffic"] == 7 * (2 * 128 * 2 * 16 * 4 + 2 * 128 * 4)
    # ulysses: q, k, v (KV replicated to 8 heads) in, the output back: 4 all-to-alls of
    # 128 x 8 x 16 float32, each sending 7/8; positions and segment ids gathered
    assert traffic["ulysses"]["attention_traffic"] == 4 * 65536 * 7 // 8 + 2 * 512 * 7


def test_closed_forms_count_what_the_kernels_send():
    n, p, d = 1 << 20, 8, 128
    ring = closed_form_bytes("ring", length=n, seq=p, q_heads=32, kv_heads=8, head_dim=d)
    # K, V in bf16 in the forward and the backward pass, dK, dV in float32 over 8 hops
    assert ring["bytes"] == 2 * 2 * n * 8 * d * 7 // 8 * 2 + 2 * n * 8 * d * 4
    rerun = closed_form_bytes("ring", length=n, seq=p, q_heads=32, kv_heads=8, head_dim=d,
                              forward_passes=2, ring_passes=1)
    assert rerun["bytes"] == ring["bytes"]      # a kept kernel residual: no second ring
    twice = closed_form_bytes("ring", length=n, seq=p, q_heads=32, kv_heads=8, head_dim=d,
                              forward_passes=2)
    assert twice["bytes"] - ring["bytes"] == 2 * n * 8 * d * 7 // 8 * 2
    ulysses = closed_form_bytes("ulysses", length=n, seq=p, q_heads=32, kv_heads=8,
                                head_dim=d, forward_passes=2)
    assert ulysses["bytes"] == 3 * 2 * (32 + 8) * n * d // 8 * 7 // 8 * 2    # 2 forward + 1
    # 2 KV heads on 8 devices are replicated to 8 before the all-to-all
    replicated = closed_form_bytes("ulysses", length=n, seq=p, q_heads=8, kv_heads=2,
                                   head_dim=d)
    assert replicated["bytes"] == 2 * 2 * (8 + 8) * n * d // 8 * 7 // 8 * 2
    hybrid = closed_form_bytes("hybrid", length=n, seq=p, q_heads=32, kv_heads=8,
                               head_dim=d, ulysses_degree=4)
    assert hybrid["bytes"] == hybrid["all-to-all"] + hybrid["ring"]
    # the ring runs over the 2 groups with the whole sequence, 2 of the 8 KV heads a device
    assert hybrid["ring"] == closed_form_bytes("ring", length=n, seq=2, q_heads=8, kv_heads=2,
                                               head_dim=d)["bytes"]
    assert closed_form_bytes("ring", length=n, seq=1, q_heads=32, kv_heads=8,
                             head_dim=d)["bytes"] == 0
    with pytest.raises(ValueError, match="unknown strategy"):
        closed_form_bytes("tree", length=n, seq=p, q_heads=32, kv_heads=8, head_dim=d)


def test_transfer_seconds_are_bytes_over_bandwidth():
    assert transfer_seconds(450e9, 450) == pytest.approx(1.0)
    assert np.isclose(transfer_seconds(50e9, 50), 1.0)


def test_replica_groups_in_each_spelling_give_the_group_size():
    from parallel.collectives import _group_size
    assert _group_size("all-gather(%x), replica_groups={{0,1,2,3},{4,5,6,7}}") == 4
    assert _group_size("all-gather(%x), replica_groups=[2,4]<=[8]") == 4
    assert _group_size("all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] "
                       "{'axis_1'}, to_apply=%add") == 4
    assert _group_size("all-reduce(%x), replica_groups=mesh['a'=2,'b'=4] {'a','b'}") == 8


def test_replica_groups_are_expanded_in_each_spelling():
    from parallel.collectives import replica_groups
    assert replica_groups("x replica_groups={{0,1},{2,3}}, d") == [[0, 1], [2, 3]]
    assert replica_groups("x replica_groups={}, d", device_count=4) == [[0, 1, 2, 3]]
    assert replica_groups("x replica_groups=[2,4]<=[8], d") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("x replica_groups=[4,2]<=[2,4]T(1,0), d") == \
        [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("x replica_groups=mesh['a'=2,'b'=4] {'a'}, d") == \
        [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("x replica_groups=mesh['a'=2,'b'=4] {'b'}, d") == \
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("x source_target_pairs={{0,4},{4,0}}, d") == [[0, 4], [4, 0]]
    assert replica_groups("x dimensions={0}") is None


HOSTS_HLO = """HloModule two_hosts, num_partitions=8

ENTRY %main (a: bf16[4,8], b: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %a2a = bf16[4,8]{1,0} all-to-all(%a), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  ROOT %cp = bf16[4,8]{1,0} collective-permute(%a2a), channel_id=2, source_target_pairs={{0,4},{4,0},{1,5},{5,1},{2,6},{6,2},{3,7},{7,3}}
}
"""  # noqa: E501 - HLO instructions one per line, as XLA prints them


def test_collectives_whose_groups_span_hosts_are_counted_as_inter_host_traffic():
    two_hosts = [0, 0, 0, 0, 1, 1, 1, 1]            # logical devices 0-3 on host 0
    got = collective_bytes(HOSTS_HLO, hosts=two_hosts)
    assert got["all-to-all"] == got["collective-permute"] == 64
    assert got["traffic"] == 64 * 3 // 4 + 64
    assert got["inter_host_traffic"] == 64                      # the permute alone
    interleaved = [0, 1, 0, 1, 0, 1, 0, 1]          # now each all-to-all group spans both
    assert collective_bytes(HOSTS_HLO, hosts=interleaved)["inter_host_traffic"] == 64 * 3 // 4
    assert collective_bytes(HOSTS_HLO)["inter_host_traffic"] == 0          # one host


ASYNC_HLO = """HloModule async_and_tpu_loops, num_partitions=8

%cond (p: (s32[], bf16[2,64])) -> pred[] {
  %p = (s32[]{:T(128)}, bf16[2,64]{1,0:T(8,128)(2,1)}) parameter(0)
  %bound = s32[]{:T(128)} constant(6)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %bound), direction=LT
}

%body (p: (s32[], bf16[2,64])) -> (s32[], bf16[2,64]) {
  %p = (s32[]{:T(128)}, bf16[2,64]{1,0:T(8,128)(2,1)}) parameter(0)
  %x = bf16[2,64]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %cps = (bf16[2,64]{1,0:T(8,128)(2,1)}, bf16[2,64]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}, metadata={op_name="jit(f)/shard_map/while/body/ppermute"}
  %cpd = bf16[2,64]{1,0:T(8,128)(2,1)} collective-permute-done(%cps)
  ROOT %t = (s32[]{:T(128)}, bf16[2,64]{1,0:T(8,128)(2,1)}) tuple(%i, %cpd)
}

ENTRY %main (a: bf16[2,64], b: s32[4]) -> bf16[2,64] {
  %a = bf16[2,64]{1,0} parameter(0)
  %b = s32[4]{0} parameter(1)
  %zero = s32[]{:T(128)} constant(1)
  %start = s32[]{:T(128)} copy(%zero)
  %init = (s32[]{:T(128)}, bf16[2,64]{1,0:T(8,128)(2,1)}) tuple(%start, %a)
  %w = (s32[]{:T(128)}, bf16[2,64]{1,0:T(8,128)(2,1)}) while(%init), condition=%cond, body=%body
  %both = ((bf16[2,64]{1,0}, s32[4]{0}), (bf16[2,64]{1,0}, s32[4]{0})) collective-permute-start(%a, %b), channel_id=2, source_target_pairs={{0,1},{1,0}}
  ROOT %r = bf16[2,64]{1,0} get-tuple-element(%w), index=1
}
"""  # noqa: E501 - HLO instructions one per line, as XLA prints them


def test_combined_async_permutes_count_every_operand():
    """XLA:GPU sends a ring hop's K, V, positions and segment ids as one permute whose
    result tuple starts with the tuple of its operands."""
    got = collective_bytes(ASYNC_HLO)
    assert got["collective-permute"] == 5 * 256 + (256 + 16)   # loop: 5 trips of bf16[2,64]


def test_a_loop_without_known_trip_count_is_counted_from_its_condition_and_start():
    """The TPU compiler leaves known_trip_count out: 1 <= i < 6 is 5 trips, the start read
    through a copy of a constant, layouts with parentheses in braces."""
    got = collective_bytes(ASYNC_HLO)
    assert got["attention_traffic"] == 5 * 256 and got["uncounted_loops"] == 0
    unreadable = ASYNC_HLO.replace("%start = s32[]{:T(128)} copy(%zero)",
                                   "%start = s32[]{:T(128)} parameter(2)")
    got = collective_bytes(unreadable)
    assert got["uncounted_loops"] == 1 and got["attention_traffic"] == 256   # once: a floor
