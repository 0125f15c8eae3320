"""The names the parallel settings choose from, in a module that imports nothing, so that
configs/base.py states its rules with these very tuples before jax is imported."""

LAYOUTS = ("zigzag", "contiguous")                      # token layouts of the seq axis
LAYOUT_SETTINGS = ("auto",) + LAYOUTS                   # mesh.layout
KERNELS = ("auto", "blockwise", "cudnn", "pallas")      # model.attention_kernel
