"""`import jax` without the CUDA plugin's start-up noise on a machine with no GPU.

With JAX's CUDA plugin installed (requirements-plan.txt, to compile for GPUs that are not
present), `import jax` loads the plugin's kernels, whose C++ start-up finds no CUDA driver
and writes six lines to the process's stderr ("Could not find cuda drivers on your
machine, GPU will not be used"), and two more when JAX later loads the plugin's PJRT
library, before any Python code can set a log level. Every command would begin with them.
`import_jax_quietly` imports jax and, where no CUDA driver is installed, loads the plugin's
shared libraries (only loads them: JAX registers the plugin later as ever, and no backend
starts, so jax.distributed and the platform settings still come first) with file
descriptor 2 pointed at a temporary file, then writes back every line but those.

On a machine with no GPU or TPU at all, JAX would still try to start each installed
plugin when its first backend is asked for: the CUDA plugin logs a 20-line traceback
("Unable to load CUDA") and libtpu five lines of missing TPU settings, on every command.
There `import_jax_quietly` sets JAX_PLATFORMS=cpu unless the user set it: compile-only
targets (parallel/targets.py) need no backend of their platform, so nothing is lost.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys
import tempfile

NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


@contextlib.contextmanager
def stderr_without(patterns: tuple[str, ...] = NOISE):
    """Run the body with the process's stderr (fd 2, C++ included) captured; afterwards
    write back each captured line that contains none of `patterns`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not any(pattern in line for pattern in patterns)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def _cuda_plugin_libraries() -> list[str]:
    """The shared libraries of JAX's CUDA PJRT plugin, if it is installed."""
    try:
        spec = importlib.util.find_spec("jax_plugins.xla_cuda12")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.origin:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.so")))


# The device files by which JAX itself (jax/_src/hardware_utils.py) tells that an NVIDIA
# GPU or a TPU is attached; /dev/kfd is AMD's ROCm driver.
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
GOOGLE_PCI_VENDOR = "0x1ae0"        # TPU chips are PCI devices of this vendor


def accelerator_attached() -> bool:
    """Whether this machine shows a GPU or TPU device (not whether a plugin can use it)."""
    if any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return True
    for vendor_file in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor_file) as vendor:
                if vendor.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def import_jax_quietly() -> None:
    """Import jax (once per process) without the lines NOISE names; on a machine with no
    accelerator and no JAX_PLATFORMS of the user's, JAX starts its CPU backend only."""
    if "jax" in sys.modules:
        return
    if not os.environ.get("JAX_PLATFORMS") and not accelerator_attached():
        os.environ["JAX_PLATFORMS"] = "cpu"
    with stderr_without():
        import jax  # noqa: F401 - imported for its side effect: later imports are free
        if ctypes.util.find_library("cuda") is None:       # no driver: the plugin's noise
            for library in _cuda_plugin_libraries():
                ctypes.CDLL(library)      # its start-up runs now; JAX's later load reuses it
