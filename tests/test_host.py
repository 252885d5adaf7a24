"""flaxdiff.host: the CLIs restart once with glibc's huge-page malloc tunable; sampling uses a CPU device per core."""

import json
import os
import subprocess
import sys

import pytest

from flaxdiff import host

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


def test_peak_memory_is_the_programs_own_not_its_parents():
    """A program started from a big process (here this one, holding 800 MB more) reports its own
    peak: ru_maxrss alone would report the parent's size, since it survives exec."""
    import numpy as np

    ballast = np.ones(100_000_000)  # 800 MB, resident
    child = subprocess.run([sys.executable, "-c", "from flaxdiff.host import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 200 * 2**20 < ballast.nbytes
