"""Shared test setup: 4 simulated CPU devices and the persistent compilation cache."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train.py and sample.py are importable by the tests

# Must happen before JAX initialises its backends: tests of data parallelism need several devices.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# decoded images of the tests' datasets: a fresh cache per session (tests must not fill ~/.cache)
os.environ.setdefault("FLAXDIFF_IMAGE_CACHE", __import__("tempfile").mkdtemp(prefix="flaxdiff-images-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory):
    """A diffusers UNet2DModel config.json small enough for subprocess training runs."""
    from cli_runs import write_micro_config
    return write_micro_config(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="session")
def finished_run(micro_config, tmp_path_factory):
    """An uninterrupted train.py run: 64 images / batch 8 = 8 steps per epoch, 4 epochs; (out, log).
    It logs to TensorBoard (tests/test_loggers.py reads the event file) and scores 16 held-out
    shapes every 16 steps (tests/test_sample_cli.py holds the values against flaxdiff.evaluate)."""
    from cli_runs import VALIDATION, flags, run_cli
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    process = run_cli(flags(micro_config, out, "--logger", "tensorboard", *VALIDATION))
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return out, output
