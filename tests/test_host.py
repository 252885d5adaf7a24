"""flaxdiff.host: the CLIs restart once with glibc's huge-page malloc tunable; sampling uses a CPU device per core."""

import json
import os
import subprocess
import sys

import pytest

from flaxdiff import host
from flaxdiff.hub import local_unet_config

needs_glibc = pytest.mark.skipif(not host.wants_restart({}), reason="needs Linux with glibc 2.35 or newer")

PROBE = ("from flaxdiff.host import restart_with_malloc_tuning; restart_with_malloc_tuning(); "
         "import json, os, sys; print(json.dumps([os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:]]))")


def probe(env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FLAXDIFF_MALLOC_TUNING")}
    env.update(env_changes)
    process = subprocess.Popen([sys.executable, "-c", PROBE, "an argument"], env=env, stdout=subprocess.PIPE,
                               text=True)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    tunables, pid, argv = json.loads(out)
    return tunables, pid, argv, process.pid


@needs_glibc
def test_restarts_once_with_the_tunable_same_pid_and_arguments():
    tunables, pid, argv, started = probe({})
    assert tunables == host.TUNABLE
    assert pid == started  # exec, not a child process: signals and `kill` reach the real run
    assert argv == ["an argument"]


@needs_glibc
def test_keeps_the_users_tunables_and_can_be_turned_off():
    assert probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[0] == f"glibc.malloc.arena_max=2:{host.TUNABLE}"
    assert probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})[0] == "glibc.malloc.hugetlb=0"  # the user's choice
    assert probe({"FLAXDIFF_MALLOC_TUNING": "0"})[0] is None


@pytest.mark.parametrize("cores, batch, env, expected", [
    (2, 16, {}, "2"), (4, 6, {}, "3"), (8, 16, {}, "8"), (2, 5, {}, None), (1, 16, {}, None),
    (2, 16, {"JAX_NUM_CPU_DEVICES": "1"}, "1"),  # the user's choice stands
    (2, 16, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, None),
])
def test_one_cpu_device_per_core_divides_the_batch(monkeypatch, cores, batch, env, expected):
    monkeypatch.setattr(host, "cpu_cores", lambda: cores)
    environ = dict(env)
    host.one_cpu_device_per_core(batch, environ)
    assert environ.get("JAX_NUM_CPU_DEVICES") == expected


def test_unet_macs_per_image_counts_each_levels_resnet_convolutions():
    """Per level: pixels x 9 x C^2 x (2 convolutions x (L down + L + 1 up resnets))."""
    one_level = dict(sample_size=8, block_out_channels=[4], layers_per_block=1)
    assert host.unet_macs_per_image(one_level) == 8 * 8 * 9 * 4 * 4 * 6
    two_levels = dict(sample_size=[8, 4], block_out_channels=[4, 16], layers_per_block=2)
    assert host.unet_macs_per_image(two_levels) == (8 * 4 * 16 + 4 * 2 * 256) * 9 * 10


def test_large_unets_sample_on_one_cpu_device(monkeypatch):
    """Per core only while each device's share of the work stays under the crossover measured by
    benchmarks/sampling_devices.py; without a config (a Hub id), the batch alone decides."""
    monkeypatch.setattr(host, "cpu_cores", lambda: 2)

    def devices(config, batch=16):
        environ = {}
        host.one_cpu_device_per_core(batch, environ, unet_config=config)
        return environ.get("JAX_NUM_CPU_DEVICES")

    def unet(channels):
        return dict(sample_size=32, block_out_channels=[channels], layers_per_block=1)
    # at batch 16 on 2 devices, 8 images per device: the widest UNet under the limit, and one wider
    channels = int((host.PER_CORE_MAX_MACS / 8 / host.unet_macs_per_image(unet(1))) ** 0.5)
    assert devices(unet(channels)) == "2"
    assert devices(unet(channels + 1)) is None
    assert devices(unet(channels + 1), batch=4) == "2"  # a smaller share per device
    assert devices(None) == "2"
    assert devices(None, batch=2 * host.PER_CORE_MAX_IMAGES + 2) is None  # many images per device
    course = dict(sample_size=32, block_out_channels=[64, 128, 128, 256], layers_per_block=2)
    ddpm = dict(sample_size=32, block_out_channels=[128, 128, 256, 256, 512, 512], layers_per_block=2)
    assert (devices(course), devices(ddpm)) == ("2", None)  # as measured: 1.15x per core, and 0.68x


def test_local_unet_config_reads_folders_without_loading(tmp_path):
    config = dict(sample_size=32, block_out_channels=[32, 64])
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "unet" / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    (run / "checkpoints" / "500").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"unet": config, "scheduler": {}}))
    assert local_unet_config(pipeline) == config
    assert local_unet_config(run) == config
    assert local_unet_config(run / "checkpoints" / "500") == config  # a checkpoint: its run's record
    assert local_unet_config(tmp_path / "missing") is None
    assert local_unet_config("someone/some-model") is None  # a Hub id: not downloaded here


def test_peak_memory_is_the_programs_own_not_its_parents():
    """A program started from a big process (here this one, holding 800 MB more) reports its own
    peak: ru_maxrss alone would report the parent's size, since it survives exec."""
    import numpy as np

    ballast = np.ones(100_000_000)  # 800 MB, resident
    child = subprocess.run([sys.executable, "-c", "from flaxdiff.host import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 200 * 2**20 < ballast.nbytes
