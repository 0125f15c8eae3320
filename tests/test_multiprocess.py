"""Two JAX processes on localhost (4 CPU devices each) train like one process with 8."""
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ8 = ["--config.mesh.seq=8", "--config.mesh.data=1", "--config.model.attention=ring",
        "--config.train.steps=4", "--config.checkpoint.every_steps=2"]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, devices, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    given = {arg.split("=", 1)[0] for arg in extra}       # a flag given twice is refused
    command = [sys.executable, "main.py", "--config", "tests/small_config.py",
               "--workdir", str(workdir),
               *[arg for arg in SEQ8 if arg.split("=", 1)[0] not in given], *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_two_processes_with_seq_spanning_both_match_one_process(tmp_path):
    finish(launch(tmp_path / "one", devices=8))
    port = free_port()
    processes = [launch(tmp_path / "two", devices=4,
                        extra=[f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}"]) for i in range(2)]
    outputs = [finish(p) for p in processes]
    assert "data 1 x seq 8" in outputs[0]                      # the printed plan's layout
    assert "step 4/4" in outputs[0] and "step 4/4" not in outputs[1]  # only process 0 logs
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    # resuming the two-process run from its checkpoint works too (with a longer budget,
    # which re-plans the schedule: said so)
    resume_port = free_port()
    processes = [launch(tmp_path / "two", devices=4,
                        extra=[f"--coordinator_address=localhost:{resume_port}",
                               "--num_processes=2", f"--process_id={i}",
                               "--config.train.steps=6",
                               "--config.train.allow_schedule_change=True"]) for i in range(2)]
    for p in processes:
        finish(p)
    assert sorted(train_losses(tmp_path / "two")) == [1, 2, 3, 4, 5, 6]


def main_py(args, devices, process=None, port=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if process is not None:
        args = [*args, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                f"--process_id={process}"]
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_export_from_two_processes_writes_the_files_of_one(tmp_path):
    """Weights split over fsdp = 8 devices of two processes: every tensor is gathered from
    both, process 0 writes, and the files equal a one-process export byte for byte."""
    workdir = str(tmp_path / "run")
    finish(main_py(["--config", "tests/small_config.py", "--workdir", workdir,
                    "--config.mesh.fsdp=8", "--config.mesh.data=1", "--config.train.steps=2",
                    "--config.eval.lengths=(64,)", "--config.eval.sliding_stride=0"], devices=8))
    finish(main_py(["--mode", "export", "--workdir", workdir, "--hf_dir", str(tmp_path / "one")],
                   devices=8))
    port = free_port()
    processes = [main_py(["--mode", "export", "--workdir", workdir, "--hf_dir",
                          str(tmp_path / "two")], devices=4, process=i, port=port)
                 for i in range(2)]
    for p in processes:
        finish(p)
    files = sorted(os.listdir(tmp_path / "one"))
    assert "model.safetensors" in files and sorted(os.listdir(tmp_path / "two")) == files
    for name in files:
        assert ((tmp_path / "two" / name).read_bytes()
                == (tmp_path / "one" / name).read_bytes()), name


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """The signal reaches process 1 only; the flags are combined after each step, so both
    stop after the same step, write its checkpoint together and exit 0."""
    import signal
    port = free_port()
    processes = [launch(tmp_path / "run", devices=4,
                        extra=[f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}", "--config.train.steps=400",
                               "--config.checkpoint.every_steps=1000"]) for i in range(2)]
    for line in processes[0].stdout:                       # process 0 prints the steps
        if " 3/400 |" in line:
            break
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[1][-2000:]
    stopped = [line for line in outputs[0].splitlines() if line.startswith("stopped after step")]
    assert len(stopped) == 1 and "(SIGTERM)" in stopped[0], outputs[0][-2000:]
    step = int(stopped[0].split()[3])
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(step)]
    assert 3 <= step < 400
