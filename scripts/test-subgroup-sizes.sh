#!/usr/bin/env bash
# Runs the tests of the kernels that have a subgroup variant (LayerNorm, cross-entropy, gradient
# norm) at every subgroup size llvmpipe (Mesa's software Vulkan driver) can be made to report,
# 4 to 128 lanes: LP_NATIVE_VECTOR_WIDTH / 32. Up to 16 lanes the subgroups are full; from 32 up
# (1024-bit vectors and more) Mesa 22 reports the size but fills only 16 lanes per subgroup, which
# checks the kernels' handling of partly filled subgroups. Mesa's shader cache does not key on
# that variable (a shader compiled at one width would be reused at another), so it is disabled.
# Extra arguments go to `cargo test`, e.g. `scripts/test-subgroup-sizes.sh --test train`.
set -euo pipefail
cd "$(dirname "$0")/.."

export WGPU_BACKEND=vulkan
export MESA_SHADER_CACHE_DISABLE=true
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--test layernorm --test crossentropy --test optimizer)
fi
cargo test --no-run "${args[@]}"
for size in 4 8 16 32 64 128; do
  echo "== subgroup size $size"
  LP_NATIVE_VECTOR_WIDTH=$((size * 32)) cargo test -q "${args[@]}"
done
