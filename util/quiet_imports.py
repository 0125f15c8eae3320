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


def import_jax_quietly() -> None:
    """Import jax (once per process) without the lines NOISE names."""
    if "jax" in sys.modules:
        return
    with stderr_without():
        import jax  # noqa: F401 - imported for its side effect: later imports are free
        if ctypes.util.find_library("cuda") is None:       # no driver: the plugin's noise
            for library in _cuda_plugin_libraries():
                ctypes.CDLL(library)      # its start-up runs now; JAX's later load reuses it
