# The environment the test suite runs in, sourced from the repository root by scripts/test.sh
# and scripts/mutants.sh. Each value can be set beforehand to override it.
export WGPU_BACKEND=${WGPU_BACKEND:-vulkan}
# Shaders with wgpu's runtime checks (bounded loops): the software driver's LLVM compiles the
# unchecked ones several times slower (it unrolls their loops), which would double CI's time.
# The unchecked path, the default elsewhere, is compared with the checked one in tests/it/gpu.rs.
export WGPT_SHADER_CHECKS=${WGPT_SHADER_CHECKS:-1}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
# Features the tests must find rather than leave out (tests/common: `needs`): the software driver
# has both, so there a test cannot pass by skipping its f16 or subgroup cases. Set it empty on an
# adapter that lacks one.
export WGPT_TEST_REQUIRE=${WGPT_TEST_REQUIRE-f16,subgroups}
# Mesa's shader cache in the build folder: llvmpipe compiles each shader variant once for all the
# test binaries (and keeps it for the next run) instead of once per process. It is keyed by the
# shader and the driver's build, not by llvmpipe's vector width, so tests/it/subgroup_sizes.rs gives
# each width a cache folder of its own.
export MESA_SHADER_CACHE_DIR=${MESA_SHADER_CACHE_DIR:-$PWD/target/mesa-shader-cache}
mkdir -p "$MESA_SHADER_CACHE_DIR"
