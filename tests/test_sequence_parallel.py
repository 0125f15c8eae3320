"""Specification of parallel/sequence_parallel.py: every strategy (ring, Ulysses,
all-gather, hybrid) equals the independent reference (1e-5 forward, 1e-4 gradients) on
meshes (8,) and data 2 x seq 4, with GQA 8 query / 2 KV heads (Ulysses over 8 devices
replicates KV), packed documents, zigzag order and lengths 512 and 333; the kernel choice
and its fallbacks; and one line for what cannot split."""
import jax
import pytest

from parallel.layout import apply_layout, restore_layout
from parallel.mesh import make_mesh
from parallel.sequence_parallel import (check_degree, choose_kernel, sequence_attention,
                                        zigzag_devices)
from tests.helpers import random_qkv
from tests.test_any_length import check_against_reference

MESHES = {"seq8": dict(data=1, fsdp=1, seq=8, tensor=1),
          "data2_seq4": dict(data=2, fsdp=1, seq=4, tensor=1)}
CASES = [("ring", None), ("ulysses", None), ("allgather", None), ("hybrid", 2), ("hybrid", 4)]


def strategy_fn(mesh_name, strategy, degree, *, causal=True, window=None, layout="zigzag",
                kernel="blockwise", implementation="cudnn"):
    """attention(q, k, v, positions, segments) through `strategy` with the tokens in
    `layout` order (permuted in, restored out)."""
    mesh = make_mesh(MESHES[mesh_name], jax.devices())
    seq = mesh.shape["seq"]
    parts = zigzag_devices(strategy, seq, degree) if layout == "zigzag" else seq

    def attention(q, k, v, positions, segments):
        length = q.shape[1]
        laid = apply_layout({"q": q, "k": k, "v": v, "p": positions, "segment_ids": segments},
                            layout, parts)
        out = sequence_attention(laid["q"], laid["k"], laid["v"], mesh=mesh, strategy=strategy,
                                 ulysses_degree=degree, positions=laid["p"],
                                 segment_ids=laid["segment_ids"], causal=causal,
                                 sliding_window=window, kernel=kernel, block_q=32, block_k=32,
                                 fused_implementation=implementation)
        return restore_layout({"out": out}, layout, parts, length)["out"]
    return attention


def case_id(case):
    strategy, degree = case
    return strategy if degree is None else f"{strategy}{degree}"


FAST = {("seq8", 333, case) for case in CASES}


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("length", [512, 333])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_strategy_equals_the_reference(mesh_name, length, case, request):
    if mesh_name == "data2_seq4" and case == ("hybrid", 4):
        pytest.skip("hybrid of degree 4 on seq 4 is Ulysses (one group): covered there")
    if (mesh_name, length, case) not in FAST:
        request.applymarker(pytest.mark.slow)
    strategy, degree = case
    batch = 4 if mesh_name == "data2_seq4" else 2
    check_against_reference(strategy_fn(mesh_name, strategy, degree), length, causal=True,
                            seed=length + len(strategy), batch=batch)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_strategy_is_exact_without_causality_and_with_a_window(case):
    strategy, degree = case
    check_against_reference(strategy_fn("seq8", strategy, degree, causal=False), 200,
                            causal=False, seed=3)
    check_against_reference(strategy_fn("seq8", strategy, degree, window=40), 200,
                            causal=True, seed=4, window=40)


def test_ulysses_over_more_devices_than_kv_heads_replicates_them():
    # 8 query / 2 KV heads on 8 devices: each KV head goes to the 4 devices that read it
    check_against_reference(strategy_fn("seq8", "ulysses", None, layout="contiguous"), 64,
                            causal=True, seed=5, packed=False)


def test_heads_that_do_not_split_over_the_all_to_all_are_one_line():
    mesh = make_mesh(MESHES["seq8"], jax.devices())
    q, k, v = random_qkv(1, 1, 64, 4, 2, 16)                   # 4 query heads over 8
    with pytest.raises(ValueError, match="4 query heads per device do not split over mesh.seq"):
        sequence_attention(q, k, v, mesh=mesh, strategy="ulysses")
    q, k, v = random_qkv(1, 1, 64, 12, 3, 16)                  # 3 KV heads over 2
    with pytest.raises(ValueError, match="3 key-value heads per device neither split"):
        sequence_attention(q, k, v, mesh=mesh, strategy="hybrid", ulysses_degree=2)
    with pytest.raises(ValueError, match="model.ulysses_degree must be a positive divisor"):
        sequence_attention(q, k, v, mesh=mesh, strategy="hybrid", ulysses_degree=3)


def test_a_hybrid_degree_larger_than_the_seq_axis_makes_one_group():
    # a curriculum level before the devices move to seq: degree 4 over seq 2 is Ulysses
    assert [check_degree("hybrid", seq, 4) for seq in (1, 2, 4, 8)] == [1, 2, 4, 4]
    assert zigzag_devices("hybrid", 2, 4) == 1
    with pytest.raises(ValueError, match="positive divisor of mesh.seq"):
        check_degree("hybrid", 6, 4)


# ----------------------------------------------------------------------------- kernels


HEADS = dict(head_dim=128, dtype="bfloat16")      # what the fused kernels take


def test_auto_takes_blockwise_off_accelerators_without_a_notice():
    # nothing changed for the user: there is no fused kernel to miss on a CPU
    said = []
    assert choose_kernel("auto", strategy="ulysses", platform="cpu", in_order=True,
                         say=said.append, **HEADS) == "blockwise"
    assert said == []


@pytest.mark.parametrize("strategy,in_order", [
    ("ring", True), ("allgather", True), ("hybrid", True), ("ulysses", False),
    ("none", False)])
def test_auto_on_a_gpu_takes_pallas_where_cudnn_cannot_apply(strategy, in_order):
    assert choose_kernel("auto", strategy=strategy, platform="gpu", in_order=in_order,
                         say=pytest.fail, **HEADS) == "pallas"


def test_auto_on_a_gpu_takes_cudnn_for_one_device_and_ulysses_on_rows_in_order():
    for strategy in ("none", "ulysses"):
        assert choose_kernel("auto", strategy=strategy, platform="gpu", in_order=True,
                             say=pytest.fail, **HEADS) == "cudnn"


@pytest.mark.parametrize("strategy", ["none", "ring", "ulysses", "allgather", "hybrid"])
def test_auto_on_a_tpu_takes_the_mosaic_kernel_in_every_strategy(strategy):
    assert choose_kernel("auto", strategy=strategy, platform="tpu", in_order=False,
                         say=pytest.fail, **HEADS) == "pallas_tpu"


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("head_dim,dtype", [(16, "bfloat16"), (128, "float32")])
def test_auto_falls_back_for_heads_the_fused_kernels_do_not_take_saying_why(platform,
                                                                           head_dim, dtype):
    said = []
    assert choose_kernel("auto", strategy="ring", platform=platform, in_order=False,
                         head_dim=head_dim, dtype=dtype, say=said.append) == "blockwise"
    assert said == [f"model.attention_kernel=auto: blockwise, because the fused kernels take "
                    f"bfloat16 or float16 heads of 64, 128, 256 (this model: {dtype}, "
                    f"head_dim {head_dim})"]


@pytest.mark.parametrize("platform,kernel", [("gpu", "pallas"), ("cpu", "pallas"),
                                             ("tpu", "pallas_tpu")])
def test_pallas_names_the_platforms_kernel_for_any_heads(platform, kernel):
    assert choose_kernel("pallas", strategy="ring", platform=platform, in_order=False,
                         head_dim=16, dtype="float32", say=pytest.fail) == kernel


def test_asking_for_cudnn_where_it_cannot_apply_is_one_line():
    with pytest.raises(ValueError, match="cudnn attention needs an NVIDIA GPU"):
        choose_kernel("cudnn", strategy="none", platform="cpu", in_order=True, **HEADS)
    with pytest.raises(ValueError, match="packed documents or in a permuted layout"):
        choose_kernel("cudnn", strategy="ulysses", platform="gpu", in_order=False, **HEADS)
    with pytest.raises(ValueError, match="no whole-sequence call"):
        choose_kernel("cudnn", strategy="ring", platform="gpu", in_order=True, **HEADS)
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        choose_kernel("flash", strategy="none", platform="gpu", in_order=True, **HEADS)


@pytest.mark.parametrize("kernel", ["pallas", "pallas_tpu"])
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_every_strategy_with_a_pallas_kernel_equals_the_reference(kernel, case):
    """Each Pallas kernel (Triton's, Mosaic TPU's: in Pallas' interpreter here) in every
    hop and call of the strategy on 8 devices: packed rows, GQA, a window, 333 tokens."""
    strategy, degree = case
    fn = strategy_fn("seq8", strategy, degree, kernel=kernel, window=40)
    check_against_reference(fn, 333, causal=True, seed=11, window=40)


@pytest.mark.parametrize("window", [None, 24])
def test_the_fused_path_of_ulysses_equals_the_reference_on_rows_in_order(window):
    """The cudnn call with XLA's implementation (same function, any platform): on one
    document in sequence order it is the reference."""
    fn = strategy_fn("seq8", "ulysses", None, layout="contiguous", kernel="cudnn",
                     implementation="xla", window=window)
    check_against_reference(fn, 128, causal=True, seed=6, packed=False, window=window)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_in_smoke_mode(capsys):
    """benchmarks/gpu_attention.py on tiny shapes with XLA's implementation of the fused
    call: both kernels timed, the train step run (figures to quote come only from a GPU)."""
    from benchmarks import gpu_attention
    gpu_attention.main(["--smoke", "--repeats", "1"])
    out = capsys.readouterr().out
    kernel_rows = [line for line in out.splitlines() if line.startswith("|") and
                   ("blockwise" in line or "cudnn" in line) and "TFLOP" not in line]
    assert len(kernel_rows) == 2 * 2 + 1, out              # 2 lengths x 2 kernels + 1 step
    assert "failed" not in out
