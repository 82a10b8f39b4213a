#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine that has no network: run HERE (where pip
# reaches PyPI), from any folder of the checkout, before carrying them there.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # DIR default .whl (at the checkout's root)
#
# Downloads benchmarks/gpu_requirements.txt (what harness needs beyond the GPU image: MLflow,
# Optuna, Hydra and their dependencies; Python 3.12, x86-64), builds antlr4-python3-runtime 4.9.3
# (Hydra's parser; published as a source archive only, pure Python), and downloads bitsandbytes
# for QLoRA, slimmed to the native library of the image's CUDA (BNB_KEEP, default cuda13: its
# torch is 2.11+cu130) so that all fits the 64 MiB a device call carries (~40 MiB in all).
# DIR is added to .git/info/exclude: never committed, carried by name (the device tool's
# `carry`: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
if [[ $dir != /* ]]; then # inside the checkout: ignored by git, never committed
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qxF "/$dir/" "$exclude" 2>/dev/null || echo "/$dir/" >>"$exclude"
fi
mkdir -p "$dir"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64; do
  platforms+=(--platform "$p")
done
download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp "${platforms[@]}" -d "$dir")

"${download[@]}" -r benchmarks/gpu_requirements.txt
python3 -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
"${download[@]}" "bitsandbytes==${BNB_VERSION:-0.50.2}"
python3 benchmarks/slim_wheel.py "$dir"/bitsandbytes-*.whl "_cpu\.so$" "_${BNB_KEEP:-cuda13}[0-9]*\.so$"
du -sh "$dir"
