"""Multi-host training, simulated: 2 local processes x 2 CPU devices (gloo collectives) against
1 process x 4 devices, then both processes killed and resumed."""

import json
import signal
import socket
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from cli_runs import flags, run_cli

STEPS = 16
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(config, out, *extra):
    port = free_port()
    # the 1-process reference gathers batches on the host (auto, on CPUs); the 2-process runs keep the
    # dataset in device memory: both data paths across devices and processes, and they must agree
    return [run_cli(flags(config, out, *extra, "--dataset_on_device", "yes", "--coordinator_address",
                          f"localhost:{port}", "--num_processes", "2", "--process_id", str(rank), steps=STEPS),
                    devices=2)
            for rank in range(2)]


def finish(processes, timeout=900):
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=timeout)
        assert process.returncode == 0, output
        outputs.append(output)
    return outputs


@pytest.fixture(scope="module")
def runs(micro_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    single = run_cli(flags(micro_config, root / "single", steps=STEPS), devices=4)
    finish([single])
    multi_logs = finish(two_processes(micro_config, root / "multi"))
    return root, multi_logs


def test_two_processes_equal_one_process(runs):
    root, logs = runs
    a, b = load_file(str(root / "single" / WEIGHTS)), load_file(str(root / "multi" / WEIGHTS))
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"\n2 processes x 2 devices vs 1 process x 4 devices after {STEPS} steps: largest weight "
          f"difference {diff:.2e}")
    assert diff < 2e-4  # float rounding of the cross-process all-reduce, amplified by Adam (see test_training)
    losses = lambda run: [json.loads(line)["loss"] for line in (root / run / "metrics.jsonl").open()]  # noqa
    np.testing.assert_allclose(losses("single"), losses("multi"), rtol=1e-4)
    assert "4 cpu device(s) in 2 process(es)" in logs[0] and "in device memory" in logs[0]
    assert logs[1].count("samples ->") == 0  # only process 0 writes images, metrics and the pipeline


def test_kill_both_processes_and_resume(runs, micro_config, tmp_path):
    root, _ = runs
    out = tmp_path / "killed"
    # checkpoints every 4 steps (they do not change the trajectory): a wide window to kill in, even on a
    # loaded machine where the asynchronous save of step 4 commits several steps later
    processes = two_processes(micro_config, out, "--checkpointing_steps", "4")
    deadline = time.time() + 900
    while not (out / "checkpoints" / "4").is_dir():
        if any(p.poll() is not None for p in processes):  # say why: a crash, or a run too fast to kill
            logs = [p.communicate(timeout=900)[0] for p in processes]
            pytest.fail("the run ended before it could be killed:\n" + "\n---\n".join(log[-3000:] for log in logs))
        assert time.time() < deadline
        time.sleep(0.02)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    steps_left = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps_left and max(steps_left) < STEPS  # killed before the end
    logs = finish(two_processes(micro_config, out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"))
    assert f"at step {max(steps_left)}" in logs[0]  # restored, not started afresh
    a, b = load_file(str(root / "multi" / WEIGHTS)), load_file(str(out / WEIGHTS))
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
