"""Specification of cli/workdir_lock.py: one writer per workdir. A second train, eval,
import or export on a held workdir exits non-zero with one line naming the holder and
changes nothing; a SIGKILLed holder blocks nobody; a refused run makes no workdir; in a
multi-process run process 0 decides for all."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.test_bad_inputs import TINY, assert_one_line, run, snapshot
from cli import workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = """
import sys, time
from cli import workdir_lock
with workdir_lock.hold(sys.argv[1], "the test's holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(workdir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture
def held(tmp_path):
    """A workdir with a file in it, locked by another process."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = start_holder(workdir)
    yield workdir, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("mode", ["train", "eval", "export", "import"])
def test_a_second_writer_is_refused_with_the_holder_named(held, tmp_path, mode):
    workdir, pid = held
    args = {"train": [*TINY], "eval": ["--mode", "eval", *TINY],
            "export": ["--mode", "export", "--hf_dir", str(tmp_path / "out")],
            "import": ["--mode", "import", "--hf_dir", str(tmp_path / "hf")]}[mode]
    before = snapshot(workdir)
    line = assert_one_line(run(*args, "--workdir", str(workdir)), str(workdir), "in use",
                           f"pid {pid}", "the test's holder")
    assert socket.gethostname() in line
    assert snapshot(workdir) == before
    assert not (tmp_path / "out").exists()


def test_a_sigkilled_holder_does_not_block_the_next_run(tmp_path):
    workdir = tmp_path / "run"
    holder = start_holder(workdir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with workdir_lock.hold(str(workdir), "the next run"):
        assert "the next run" in (workdir / workdir_lock.LOCK_FILE).read_text()


def test_the_lock_is_free_again_after_its_block(tmp_path):
    with workdir_lock.hold(str(tmp_path), "first"):
        with pytest.raises(ValueError, match="in use by host .*first"):
            workdir_lock.acquire(str(tmp_path), "second")
    with workdir_lock.hold(str(tmp_path), "second"):
        pass


@pytest.mark.parametrize("args", [
    ["--config.train.learning_rate=-1"],              # a key's own range
    ["--config.mesh.seq=3"],                          # the config against the devices
])
def test_a_refused_run_makes_no_workdir(tmp_path, args):
    workdir = tmp_path / "never"
    assert run(*TINY, *args, "--workdir", str(workdir)).returncode == 2
    assert not workdir.exists()


VERDICT = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[3]))
from cli import workdir_lock
try:
    with workdir_lock.hold(sys.argv[1], "two processes", process_index=jax.process_index()):
        print("ran", flush=True)
except ValueError as error:
    print("refused:", error, flush=True)
"""


def run_two_processes(workdir):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    processes = [subprocess.Popen([sys.executable, "-c", VERDICT, str(workdir), address,
                                   str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return [p.communicate(timeout=120)[0] for p in processes]


@pytest.mark.slow
def test_in_a_multi_process_run_process_zero_decides_for_all(tmp_path):
    workdir = tmp_path / "run"
    outputs = run_two_processes(workdir)
    assert all("ran" in out for out in outputs), outputs
    holder = start_holder(workdir)
    try:
        outputs = run_two_processes(workdir)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in outputs[0], outputs
    assert "process 0 of this run could not lock it" in outputs[1], outputs
