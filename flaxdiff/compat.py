"""Version shims: the JAX and Flax APIs that changed between the oldest versions flaxdiff supports
(pyproject.toml's floors, which CI tests) and today's. Every version-specific line is here.

The floors are what the users' runtimes ship: Kaggle's TPU image (jax 0.6.2 with libtpu 0.0.17)
and Colab's (jax 0.7.2, flax 0.11.2). What moved since:

* marking a replicated value as varying over a mesh axis: `jax.lax.pvary` (jax 0.6-0.7) became
  `jax.lax.pcast(..., to="varying")` (jax 0.8+);
* which mesh axes a value varies over: `aval.vma` (jax 0.6-0.9), `aval.manual_axis_type.varying`
  (jax 0.10+);
* the context mesh: `jax.sharding.use_mesh` (jax 0.6) became `jax.set_mesh` (jax 0.7+);
* lists of submodules: plain lists are graph nodes in flax 0.11, `nnx.List` is required in 0.12+;
* a Variable's array: `.value` in flax 0.11, `get_value()` / `set_value()` in 0.12+.
"""

from __future__ import annotations

import jax
from flax import nnx

ModuleList = getattr(nnx, "List", list)  # flax >= 0.12 needs nnx.List; 0.11 takes a plain list


def pcast_varying(tree, axes):
    """Mark replicated values as varying over mesh `axes` (inside shard_map)."""
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(tree, axes, to="varying")
    return jax.lax.pvary(tree, axes)


def varying_axes(x) -> frozenset:
    """The shard_map mesh axes along which x varies (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return manual.varying if manual is not None else frozenset(getattr(aval, "vma", ()))


def leading_axis_sharded(x) -> bool:
    """Whether x's first axis is sharded in its type (explicit sharding, jax.make_mesh's default
    in jax 0.7+); False under automatic sharding and inside shard_map."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and spec[0] is not None


def set_mesh(mesh):
    """`with set_mesh(mesh):` the context mesh, on every supported JAX."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)


def variable_value(variable):
    """An nnx.Variable's array (flax 0.12+: get_value(); 0.11: .value)."""
    return variable.get_value() if hasattr(type(variable), "get_value") else variable.value


def set_variable_value(variable, value) -> None:
    """Replace an nnx.Variable's array (flax 0.12+: set_value(); 0.11: .value = ...)."""
    if hasattr(type(variable), "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


def enable_x64():
    """`with enable_x64():` float64 in JAX (jax.enable_x64 since 0.7; jax.experimental before)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64()
    from jax.experimental import enable_x64 as experimental_enable_x64

    return experimental_enable_x64()
