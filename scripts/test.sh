#!/usr/bin/env bash
# Runs the whole test suite. Where no Vulkan driver is installed (a machine without a GPU), it
# first installs Mesa's software Vulkan driver (llvmpipe/lavapipe), which runs the shaders on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

# A Vulkan driver is installed when an ICD manifest exists in either folder and the loader is.
if ! { compgen -G '/usr/share/vulkan/icd.d/*.json' || compgen -G '/etc/vulkan/icd.d/*.json'; } >/dev/null \
   || ! ldconfig -p | grep libvulkan.so.1 >/dev/null; then
  echo "no Vulkan driver found: installing Mesa's software Vulkan driver"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi

export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
# Shaders with wgpu's runtime checks (bounded loops): the software driver's LLVM compiles the
# unchecked ones several times slower (it unrolls their loops), which would double CI's time.
# The unchecked path, the default elsewhere, is compared with the checked one in tests/gpu.rs.
export WGPT_SHADER_CHECKS=${WGPT_SHADER_CHECKS:-1}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

cargo test --workspace --locked "$@"

# With no arguments (the whole suite), the data-parallel test too.
[ "$#" -eq 0 ] || exit 0

# Data-parallel training (the `mpi` feature) goes through Open MPI: mpirun, its headers and
# mpicc (libopenmpi-dev), and libclang, with which the mpi crate reads the headers.
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null \
   || ! ldconfig -p | grep 'libclang[-.0-9]*\.so' >/dev/null; then
  echo "no Open MPI found: installing Open MPI and libclang"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openmpi-bin libopenmpi-dev libclang-dev >/dev/null
fi
# Two ranks under mpirun against one process with --grad-accum 2, the ranks' weights, resumes.
cargo test --locked --features mpi --test mpi
