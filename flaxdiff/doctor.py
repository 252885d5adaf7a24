"""`python -m flaxdiff.doctor`: what this machine runs flaxdiff with, and what to fix.

    python -m flaxdiff.doctor

Prints the versions of flaxdiff, jax, jaxlib and the accelerator plugin (libtpu or the CUDA
plugin) and whether they match, the backend and its devices with their memory, the compilation
cache folder and the malloc tuning; then, for each problem it finds, the command that fixes it.
Paste its output into bug reports. train.py prints its first line at the top of every log.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys

from . import backend, host, parallel

CORE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
# the plugin pip package -> the extra of `jax` that pins it, and JAX's name for its platform
PLUGINS = {"libtpu": ("tpu", "tpu"), "jax-cuda12-plugin": ("cuda12", "gpu"), "jax-cuda13-plugin": ("cuda13", "gpu")}


@dataclasses.dataclass
class Finding:
    problem: str
    fix: str


def expected_plugin(jax_version: str, plugin: str) -> str | None:
    """The version specifier the installed jax's own release pins for a plugin (`pip install
    jax[tpu]` would install it), from jax's package metadata; None if it pins none."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return None
    for line in importlib.metadata.requires("jax") or ():
        requirement = Requirement(line)
        if requirement.name == plugin and requirement.marker is not None:
            return str(requirement.specifier) or None
    return None


def _specifier_holds(specifier: str, version: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)


def version_findings(versions: dict[str, str | None], imported_jax: str | None) -> list[Finding]:
    """Mismatches between jax, jaxlib and the plugins, and a JAX in memory older than on disk."""
    findings = []
    jax_version, jaxlib_version = versions.get("jax"), versions.get("jaxlib")
    if jax_version is None:
        return [Finding("jax is not installed", 'pip install -U "jax[tpu]" (TPU), "jax[cuda12]" (GPU) or jax (CPU)')]
    if imported_jax and imported_jax != jax_version:
        findings.append(Finding(f"this Python process imported jax {imported_jax}, but jax {jax_version} is "
                                "installed now (an install after the import)",
                                "restart the runtime (Colab/Kaggle: Runtime > Restart session), then run again"))
    if jaxlib_version and jaxlib_version != jax_version:
        findings.append(Finding(f"jaxlib {jaxlib_version} does not match jax {jax_version}",
                                f'pip install "jax=={jax_version}" "jaxlib=={jax_version}"'))
    for plugin, (extra, _) in PLUGINS.items():
        installed = versions.get(plugin)
        specifier = expected_plugin(jax_version, plugin) if installed else None
        if installed and specifier and not _specifier_holds(specifier, installed):
            findings.append(Finding(f"{plugin} {installed} is not the one jax {jax_version} is released with "
                                    f"({plugin}{specifier}); JAX may refuse it",
                                    f'pip install "jax[{extra}]=={jax_version}" (installs the matching {plugin}), '
                                    "then restart the runtime"))
    return findings


def backend_findings(versions: dict[str, str | None], mismatched: bool) -> tuple[list[Finding], list[str]]:
    """Initialise JAX: report its backend and devices, and a plugin that failed to load (`mismatched`:
    the versions already disagree, so the fix is the matching plugin)."""
    import jax

    findings, lines = [], []
    devices = jax.devices()
    memory = parallel.device_memory_bytes()
    each = f", {parallel.format_bytes(memory)} each" if memory else ""
    lines.append(f"backend: {jax.default_backend()}, {len(devices)} device(s) ({devices[0].device_kind}){each}, "
                 f"{jax.process_count()} process(es)")
    for plugin, (extra, platform) in PLUGINS.items():
        if versions.get(plugin) and jax.default_backend() == "cpu":
            try:
                jax.devices(platform)
                reason = "JAX chose the CPU"
            except RuntimeError as error:
                reason = str(error).splitlines()[0]
            reinstall = f'pip install "jax[{extra}]=={versions["jax"]}", then restart the runtime'
            fix = reinstall if mismatched else (
                f"if this machine has a {platform.upper()}, it is not free or not visible to this process "
                f"(Colab/Kaggle: check the runtime's accelerator type); if the plugin is damaged: {reinstall}")
            findings.append(Finding(f"{plugin} {versions[plugin]} is installed but JAX runs on the CPU: {reason}", fix))
    return findings, lines


def installed_versions() -> dict[str, str | None]:
    return {name: backend.installed(name) for name in (*CORE, *PLUGINS)}


def summary(versions: dict[str, str | None] | None = None) -> str:
    """One line: versions, whether they match, backend and devices, cache, malloc tuning."""
    import jax

    versions = versions or installed_versions()
    plugins = [f"{name} {versions[name]}" for name in PLUGINS if versions.get(name)]
    problems = version_findings(versions, jax.__version__)
    devices = jax.devices()
    cache = jax.config.jax_compilation_cache_dir or "off"
    return (f"flaxdiff {backend.installed('flaxdiff')}, jax {versions['jax']}, jaxlib {versions['jaxlib']}"
            + "".join(f", {p}" for p in plugins) + f" ({'versions match' if not problems else 'MISMATCH: '}"
            + "; ".join(f.problem for f in problems) + f"); {jax.default_backend()}: {len(devices)} "
            f"{devices[0].device_kind} device(s); compilation cache {cache}; malloc tuning {_malloc_state()}"
            + ("; TPU/GPU code paths forced" if backend.forced() else ""))


def _malloc_state() -> str:
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return "on"
    return "available" if host.wants_restart() else "off"


def main(argv=None) -> int:
    from .runtime import enable_compilation_cache

    versions = installed_versions()
    imported = sys.modules.get("jax")
    imported_version = getattr(imported, "__version__", None)
    print(f"flaxdiff {backend.installed('flaxdiff')}, Python {sys.version.split()[0]}")
    print("packages: " + ", ".join(f"{name} {version}" for name, version in versions.items() if version))
    findings = version_findings(versions, imported_version)
    enable_compilation_cache()
    more, lines = backend_findings(versions, mismatched=bool(findings))
    findings += more
    for line in lines:
        print(line)
    import jax

    print(f"compilation cache: {jax.config.jax_compilation_cache_dir}")
    print(f"malloc tuning: {_malloc_state()} ({host.TUNABLE} for the CLIs on CPU hosts)")
    print(f"TPU/GPU code paths: {'yes' if backend.accelerator_paths() else 'no'} "
          f"({backend.SWITCH}={os.environ.get(backend.SWITCH, '0')})")
    if not findings:
        print("no problems found")
        return 0
    for finding in findings:
        print(f"problem: {finding.problem}\n  fix: {finding.fix}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
