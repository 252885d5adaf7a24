#!/usr/bin/env bash
# Install flaxdiff (this checkout) without moving the jax, jaxlib and TPU/GPU plugin this Python
# already has. Colab and Kaggle ship JAX built for their libtpu / CUDA plugin; a plain `pip install`
# could upgrade jax alone (flax's newest releases need a newer jax) and leave the plugin behind,
# and JAX refuses a plugin that does not match its jaxlib. With the installed versions as pip
# constraints, pip picks the newest flax, optax and orbax that work with them instead.
#
#     bash scripts/install-keep-jax.sh            # then: python train.py ...
#     bash scripts/install-keep-jax.sh '.[test]'  # with extras; further arguments go to pip
#
# Where no JAX is installed yet (a laptop), this is a plain install of the newest JAX.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
target="$here"
if [[ $# -gt 0 && $1 == .\[* ]]; then
  target="$here${1#.}"
  shift
fi
constraints="$(mktemp)"
"$python" -m pip freeze 2>/dev/null \
  | grep -iE '^(jax|jaxlib|libtpu|libtpu-nightly|jax[-_]cuda[0-9]+[-_](plugin|pjrt)|jax[-_]rocm[0-9]*[-_](plugin|pjrt))==' \
  > "$constraints" || true
echo "keeping: $(tr '\n' ' ' < "$constraints")"
"$python" -m pip install -c "$constraints" "$@" -e "$target"
rm -f "$constraints"
