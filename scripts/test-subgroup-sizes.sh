#!/usr/bin/env bash
# Runs whole test binaries at every subgroup size llvmpipe (Mesa's software Vulkan driver) can be
# made to report, 4 to 128 lanes: LP_NATIVE_VECTOR_WIDTH / 32. CI does not need it:
# tests/it/subgroup_sizes.rs checks every kernel with a subgroup path at each of these sizes (one
# child process per size) as part of `cargo test`. This script is for the rest of a test binary at
# each size, e.g. `scripts/test-subgroup-sizes.sh --test it -- train::` (the training tests); without
# arguments it runs the LayerNorm, cross-entropy and optimiser tests (every dtype, both reduction
# paths). Up to 16 lanes the subgroups are full; from 32 up (1024-bit vectors and more) llvmpipe
# reports the size but runs only 16 lanes per subgroup (Mesa 22.3 and 25.0 alike), which checks the
# kernels' handling of partly filled subgroups. Mesa's shader cache does not key on that variable
# (a shader compiled at one width would be reused at another), so each width has a cache folder of
# its own; the engine's pipeline cache file is named after the adapter alone, so it is disabled.
set -euo pipefail
cd "$(dirname "$0")/.."

export WGPU_BACKEND=vulkan
export WGPT_CACHE_DIR=
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--test it -- layernorm:: crossentropy:: optimizer::)
fi
cargo test --no-run "${args[@]}"
for size in 4 8 16 32 64 128; do
  echo "== subgroup size $size"
  LP_NATIVE_VECTOR_WIDTH=$((size * 32)) MESA_SHADER_CACHE_DIR=$PWD/target/mesa-shader-cache/lanes-$size \
    cargo test -q "${args[@]}"
done
