"""The runtimes users train on: single-host stays single-host, XLA flags only where they are known,
the TPU/GPU switch, and the diagnosis command."""

import jax
import pytest

from flaxdiff import _xla_flags, backend, doctor, runtime

COLAB_TPU = {"COLAB_RELEASE_TAG": "release-colab", "TPU_ACCELERATOR_TYPE": "v5litepod-1", "TPU_WORKER_ID": "0",
             "TPU_SKIP_MDS_QUERY": "1"}
KAGGLE_TPU = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "TPU_PROCESS_ADDRESSES": "local",
              "TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
ONE_GPU = {"CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all"}


@pytest.mark.parametrize("environ, multi_host", [
    ({}, False),
    (COLAB_TPU, False),
    (KAGGLE_TPU, False),
    (ONE_GPU, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", "TPU_WORKER_ID": "1"}, True),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476"}, True),
], ids=["plain", "colab-tpu", "kaggle-tpu", "one-gpu", "slurm-1-task", "slurm-4-tasks", "tpu-pod", "tpu-processes"])
def test_single_host_runtimes_stay_single_host(monkeypatch, environ, multi_host):
    assert runtime.cluster_detected(environ) is multi_host
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for key in list(__import__("os").environ):
        if key.startswith(("SLURM_", "TPU_")):
            monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    runtime.initialize_distributed()
    assert bool(calls) is multi_host
    calls.clear()
    runtime.initialize_distributed("localhost:1234", 1, 0)  # flags for one process: nothing to join
    assert not calls


@pytest.mark.parametrize("jaxlib, environ, expected", [
    ("0.10.2", {}, ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]),
    ("0.8.1", {}, ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]),
    ("0.8.0", {}, []),  # XLA would abort on a flag it does not know
    ("0.6.2", {}, []),
    ("0.10.2", {"JAX_PLATFORMS": "tpu"}, []),  # not the CPU backend
    ("0.10.2", {"JAX_PLATFORMS": "cpu"}, ["--xla_cpu_experimental_ynn_fusion_type=dot,reduce"]),
    ("0.10.2", {backend.SWITCH: "1"}, []),
    ("0.10.2", {"FLAXDIFF_XLA_CPU_YNN": "0"}, []),
    ("0.10.2", {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}, []),  # the user's choice stands
])
def test_xla_cpu_flags_only_where_known(jaxlib, environ, expected):
    assert _xla_flags.cpu_flags(environ, jaxlib) == expected


def test_an_installed_accelerator_plugin_means_no_cpu_tricks(monkeypatch):
    monkeypatch.setattr(backend, "installed", lambda name: "0.0.21.1" if name == "libtpu" else None)
    assert backend.accelerator_expected({})
    assert not backend.accelerator_expected({"JAX_PLATFORMS": "cpu"})
    assert _xla_flags.cpu_flags({}, "0.10.2") == []


@pytest.mark.parametrize("versions, imported, problems", [
    ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "0.10.2", []),
    ({"jax": "0.10.2", "jaxlib": "0.7.2"}, "0.10.2", ['pip install "jax==0.10.2" "jaxlib==0.10.2"']),
    ({"jax": "0.10.2", "jaxlib": "0.10.2"}, "0.7.2", ["restart the runtime"]),
])
def test_doctor_names_the_fix(versions, imported, problems):
    findings = doctor.version_findings(versions, imported)
    assert [f for f in findings if not any(p in f.fix for p in problems)] == []
    assert len(findings) == len(problems)


def test_doctor_knows_the_plugin_a_jax_release_pins(monkeypatch):
    """From jax's own metadata: the libtpu its release pins; an older one is a mismatch whose fix
    installs the matching plugin for the installed jax."""
    specifier = doctor.expected_plugin(jax.__version__, "libtpu")
    assert specifier and specifier.startswith("==")
    findings = doctor.version_findings({"jax": jax.__version__, "jaxlib": jax.__version__, "libtpu": "0.0.1"},
                                       jax.__version__)
    assert len(findings) == 1 and f'"jax[tpu]=={jax.__version__}"' in findings[0].fix


def test_doctor_command(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for text in ("packages: jax", "backend: cpu, 4 device(s)", "compilation cache:", "malloc tuning:",
                 "no problems found"):
        assert text in out, out
    assert doctor.summary().startswith("flaxdiff ") and "versions match" in doctor.summary()


def test_a_failed_gloo_connection_is_one_error_line(capsys):
    """XLA:CPU's runtime error when the processes of a multi-process job cannot connect: one line
    that says what to do, exit code 1; any other runtime error keeps its traceback."""
    from flaxdiff.cli import report_errors

    def gloo_fails():
        raise RuntimeError("UNKNOWN: Gloo context initialization failed: [external/gloo/gloo/transport/tcp/pair.h:301] "
                           "Connect timeout [none]\nmore detail")
    assert report_errors(gloo_fails) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Connect timeout" in err and "--resume_from_checkpoint latest" in err

    def other_failure():
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        report_errors(other_failure)
