"""The accelerators a plan can compile for without having them, and their public figures.

`plan.target` names one of TARGETS. `cpu` is this machine's (simulated) devices; every
other target gives compile-only devices of a GPU or TPU that is not attached:
`compile_only_devices(target, count)` asks JAX's CUDA plugin (a GpuTargetConfigProto text
from gpu_specs/) or libtpu (a topology name such as "v5p:2x2x2") for `count` devices, on
which `jit(...).lower(...).compile()` runs that accelerator's own compiler. Nothing runs
and nothing is allocated. The figures (memory, dense bf16 peak, memory and link bandwidth)
are the vendors' published ones, cited in `sources`; `step_time_bound` turns a compiled
step's FLOPs and bytes into a lower bound on its time, never a measurement.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

GIB = 2 ** 30
SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
GPU_REQUIREMENTS = "requirements-gpu.txt"
TPU_REQUIREMENTS = "requirements-tpu.txt"
COMPILE_ONLY_REQUIREMENTS = "requirements-plan.txt"

# Chips of a slice -> its libtpu topology (Google Cloud's documented slice shapes).
# v5p: https://cloud.google.com/tpu/docs/v5p ("Configurations"; v5p-N names count
# TensorCores, two per chip: v5p-8 is 4 chips, 2x2x1); v5e: https://cloud.google.com/tpu/docs/v5e;
# v6e: https://cloud.google.com/tpu/docs/v6e.
_V5P_SLICES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
               256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16",
               4096: "16x16x16", 6144: "16x16x24"}
_2D_SLICES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator: what its devices are and the published figures a plan uses.
    Bandwidths are per device and per direction (what one device can send at once)."""
    name: str                       # the plan.target value
    platform: str                   # "cpu" | "gpu" | "tpu" (jax Device.platform)
    description: str
    memory_gib: float = 0.0         # device memory (HBM) per device
    peak_bf16_tflops: float = 0.0   # dense bf16 matmul peak per device
    memory_gbps: float = 0.0        # HBM bandwidth, GB/s
    intra_host_gbps: float = 0.0    # to a device of the same host (NVLink; TPU: ICI)
    inter_host_gbps: float = 0.0    # to a device of another host (InfiniBand; TPU: ICI)
    host_link_gbps: float = 0.0     # to its host's memory (PCIe; 0: no published figure)
    devices_per_host: int = 0
    sources: tuple = ()
    spec_file: str = ""             # GPU: the GpuTargetConfigProto text in gpu_specs/
    topology_prefix: str = ""       # TPU: "v5p" in "v5p:2x2x2"
    slices: dict = dataclasses.field(default_factory=dict)   # TPU: chips -> topology

    @property
    def compile_only(self) -> bool:
        return self.platform != "cpu"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


_H100_SOURCES = ("NVIDIA H100 datasheet, https://www.nvidia.com/en-us/data-center/h100/: "
                 "H100 SXM 80 GB HBM3 at 3.35 TB/s, BF16 1,979 TFLOPS with sparsity "
                 "(989 dense), NVLink 900 GB/s (450 each way), PCIe Gen5 128 GB/s (64 each way, "
                 "to host memory)",
                 "NVIDIA DGX H100/H200 user guide, https://docs.nvidia.com/dgx/"
                 "dgxh100-user-guide/: eight ConnectX-7 400 Gb/s InfiniBand ports per 8-GPU "
                 "host, i.e. 50 GB/s per GPU across hosts")

TARGETS = {t.name: t for t in (
    Target("cpu", "cpu", "this machine's CPU devices (simulated with plan.devices=N)"),
    Target("h100", "gpu", "NVIDIA H100 SXM5 80GB", memory_gib=80, peak_bf16_tflops=989,
           memory_gbps=3350, intra_host_gbps=450, inter_host_gbps=50, host_link_gbps=64,
           devices_per_host=8, sources=_H100_SOURCES, spec_file="h100.txtpb"),
    Target("a100", "gpu", "NVIDIA A100 SXM4 80GB", memory_gib=80, peak_bf16_tflops=312,
           memory_gbps=2039, intra_host_gbps=300, inter_host_gbps=25, host_link_gbps=32,
           devices_per_host=8,
           sources=("NVIDIA A100 datasheet, https://www.nvidia.com/en-us/data-center/a100/: "
                    "A100 80GB SXM 2,039 GB/s, BF16 312 TFLOPS dense, NVLink 600 GB/s "
                    "(300 each way), PCIe Gen4 64 GB/s (32 each way, to host memory)",
                    "NVIDIA DGX A100 user guide, https://docs.nvidia.com/dgx/"
                    "dgxa100-user-guide/: eight ConnectX-6 200 Gb/s InfiniBand ports per "
                    "8-GPU host, i.e. 25 GB/s per GPU across hosts"),
           spec_file="a100.txtpb"),
    Target("h200", "gpu", "NVIDIA H200 SXM 141GB", memory_gib=141, peak_bf16_tflops=989,
           memory_gbps=4800, intra_host_gbps=450, inter_host_gbps=50, host_link_gbps=64,
           devices_per_host=8,
           sources=("NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/: "
                    "141 GB HBM3e at 4.8 TB/s, BF16 1,979 TFLOPS with sparsity (989 dense), "
                    "NVLink 900 GB/s (450 each way), PCIe Gen5 128 GB/s (64 each way)",
                    _H100_SOURCES[1]),
           spec_file="h200.txtpb"),
    Target("v5e", "tpu", "Google TPU v5e", memory_gib=16, peak_bf16_tflops=197,
           memory_gbps=819, intra_host_gbps=200, inter_host_gbps=200, devices_per_host=8,
           sources=("https://cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16 per chip, "
                    "16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip (200 each "
                    "way; every chip of a slice is on ICI)",),
           topology_prefix="v5e", slices=_2D_SLICES),
    Target("v5p", "tpu", "Google TPU v5p", memory_gib=95, peak_bf16_tflops=459,
           memory_gbps=2765, intra_host_gbps=600, inter_host_gbps=600, devices_per_host=4,
           sources=("https://cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16 per chip, "
                    "95 GiB HBM2e at 2,765 GB/s, ICI 1,200 GB/s bidirectional per chip (600 "
                    "each way; every chip of a slice is on ICI), 4 chips per host",),
           topology_prefix="v5p", slices=_V5P_SLICES),
    Target("v6e", "tpu", "Google TPU v6e (Trillium)", memory_gib=32, peak_bf16_tflops=918,
           memory_gbps=1638, intra_host_gbps=400, inter_host_gbps=400, devices_per_host=8,
           sources=("https://cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16 per chip, "
                    "32 GB HBM at 1,638 GB/s, ICI 800 GB/s bidirectional per chip (400 each "
                    "way; every chip of a slice is on ICI)",),
           topology_prefix="v6e", slices=_2D_SLICES),
)}
NAMES = tuple(TARGETS)


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"plan.target must be one of {NAMES}, got {name!r}")
    return TARGETS[name]


def topology_name(target: Target, count: int) -> str:
    """The topology string of `count` devices of `target`: for a GPU "slices x hosts x
    devices per host" (8 H100 = "1x1x8", 16 = "1x2x8"), for a TPU libtpu's slice name
    (8 v5p chips = "v5p:2x2x2"). A count no such machine has is a ValueError line."""
    if count < 1:
        raise ValueError(f"plan.devices must be >= 1 to plan for {target.name}, got {count}")
    if target.platform == "gpu":
        per_host = target.devices_per_host
        if count <= per_host:
            return f"1x1x{count}"
        if count % per_host:
            raise ValueError(f"plan.devices={count}: {target.name} hosts hold {per_host} GPUs "
                             f"each; plan 1 to {per_host} GPUs or a multiple of {per_host}")
        return f"1x{count // per_host}x{per_host}"
    if count not in target.slices:
        raise ValueError(f"plan.devices={count}: no {target.name} slice has {count} chips "
                         f"(slices: {', '.join(str(n) for n in target.slices)} chips)")
    return f"{target.topology_prefix}:{target.slices[count]}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_plugin(target: Target) -> None:
    """A ValueError line naming what to install when the compiler of `target` is absent."""
    if target.platform == "gpu" and not (_installed("jax_plugins.xla_cuda12")
                                         and _installed("jax_cuda12_plugin")):
        raise ValueError(
            f"plan.target={target.name} compiles with JAX's CUDA plugin, which is not "
            f"installed: pip install -r {GPU_REQUIREMENTS} (a GPU host), or for planning "
            f"only: pip install --no-deps -r {COMPILE_ONLY_REQUIREMENTS}")
    if target.platform == "tpu" and not _installed("libtpu"):
        raise ValueError(
            f"plan.target={target.name} compiles with libtpu, which is not installed: "
            f"pip install -r {TPU_REQUIREMENTS} (a TPU host), or for planning only: "
            f"pip install --no-deps -r {COMPILE_ONLY_REQUIREMENTS}")


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfigProto text of a GPU target (comments included: protobuf's text
    format skips them)."""
    with open(os.path.join(SPEC_DIR, target.spec_file)) as f:
        return f.read()


def _compile_only_libtpu() -> None:
    """libtpu asks the Cloud TPU metadata server for its host's slice and prints three error
    lines when there is none, and lets one process at a time load it (a lock file in /tmp:
    two plans, or two test workers, would collide); a compile-only topology needs neither.
    Set only where unset, so a TPU host keeps its own values."""
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def compile_only_devices(target: Target, count: int) -> list:
    """`count` compile-only devices of `target` (jax Devices whose platform is "gpu" or
    "tpu"): meshes and compiles work on them, nothing can run. A missing plugin or a count
    no machine has is a ValueError line."""
    topology = topology_name(target, count)
    check_plugin(target)
    from jax.experimental import topologies
    if target.platform == "gpu":
        description = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(target), topology=topology)
    else:
        _compile_only_libtpu()
        # one chip, or v5e/v6e's 8 on one host: libtpu's default host is 2x2x1
        bounds = {1: (1, 1, 1), 8: (2, 4, 1)}.get(count) if len(topology.split("x")) == 2 \
            else None
        kwargs = {"chips_per_host_bounds": bounds} if bounds else {}
        description = topologies.get_topology_desc(topology, "tpu", **kwargs)
    devices = list(description.devices)
    if len(devices) != count:
        raise ValueError(f"{target.name} topology {topology} gave {len(devices)} devices, "
                         f"not {count}")
    return devices


def hosts(devices) -> int:
    """The number of hosts (processes) `devices` span."""
    return len({d.process_index for d in devices})


def step_time_bound(target: Target, *, flops: float, min_bytes: float, intra_bytes: float,
                    inter_bytes: float, host_bytes: float = 0.0) -> dict:
    """A lower bound on one step's seconds on one device of `target`, from the published
    peaks: compute = flops / dense bf16 peak, memory = min_bytes / HBM bandwidth, links =
    intra_bytes / intra-host + inter_bytes / inter-host bandwidth, offload = host_bytes
    (offloaded in the forward pass) out and back over the host link (PCIe; None where the
    target has no published figure). "step_s" adds links and offload to the larger of
    compute and memory (no overlap); "overlap_s" is the largest of the four (perfect
    overlap), the tighter bound. "offload_hidden": each direction's copies take no longer
    than the compute they can overlap: the forward pass's third of the model FLOPs going
    out, the backward's two thirds coming back (layers alike, so totals compare as per
    layer)."""
    compute = flops / (target.peak_bf16_tflops * 1e12)
    memory = min_bytes / (target.memory_gbps * 1e9)
    links = intra_bytes / (target.intra_host_gbps * 1e9) + \
        inter_bytes / (target.inter_host_gbps * 1e9)
    offload = None
    if host_bytes and target.host_link_gbps:
        offload = 2 * host_bytes / (target.host_link_gbps * 1e9)
    serial = offload or 0.0
    return {"compute_s": compute, "memory_s": memory, "collective_s": links,
            "offload_s": offload,
            "offload_hidden": None if offload is None else offload / 2 <= compute / 3,
            "step_s": max(compute, memory) + links + serial,
            "overlap_s": max(compute, memory, links, serial)}
