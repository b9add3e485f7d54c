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

# The tests' environment (backend, shader checks, required features, shader cache).
. scripts/test-env.sh

# Runs cargo test with "$@", then prints how long each test binary took, slowest first.
timed_cargo_test() {
  local status
  set +e
  cargo test "$@" 2>&1 | perl -MTime::HiRes=time -ne '
    BEGIN { $| = 1; $start = time; }
    print;
    if (/^\s+(?:Running (?:unittests )?|Doc-tests )(\S+)/) {
      my $now = time;
      $t{$cur} += $now - $since if defined $cur;
      ($cur, $since) = ($1, $now);
      $build = $now - $start unless defined $build;
    }
    END {
      $t{$cur} += time - $since if defined $cur;
      printf "\ntime: %.0f s building, %.0f s in %d test binaries; slowest:\n", $build // (time - $start),
        eval { my $s = 0; $s += $_ for values %t; $s }, scalar keys %t;
      my @k = sort { $t{$b} <=> $t{$a} } keys %t;
      printf "  %7.1f s  %s\n", $t{$_}, $_ for @k[0 .. ($#k < 9 ? $#k : 9)];
    }'
  status=${PIPESTATUS[0]}
  set -e
  return "$status"
}

timed_cargo_test --workspace --locked "$@"

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
# With the workspace's features (as the build above), so that only wgpt itself is built again.
timed_cargo_test --workspace --locked --features wgpt/mpi --test mpi
