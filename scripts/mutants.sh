#!/usr/bin/env bash
# Mutation check of the test suite (not part of CI: each mutation rebuilds the library and runs a
# test binary, several minutes apiece on the software driver). Each mutation below is a bug the
# suite must catch; the script applies it to a scratch copy of the committed tree (the working
# tree is never touched), runs the tests that guard that code, and prints a table:
#   caught   the tests failed, as they must
#   MISSED   the tests passed with the bug in place
#   stale    the mutation no longer applies (the code moved: update its pattern here)
#   no build the mutated code did not compile (not a test of anything: fix the mutation)
#
#   scripts/mutants.sh                 all mutations
#   scripts/mutants.sh NAME...         only these (names as in the table)
#   scripts/mutants.sh --list          the names
# Exit status: 0 when every mutation run was caught.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# Each mutation: its name, the file it changes, a perl substitution applied with `perl -0pi -e`,
# and the arguments of the `cargo test` that must then fail.
mutations() {
  mutation f16-accumulator shaders/matmul.wgsl \
    's/acc\[o\] = acc\[o\] \+ ar \* bv\[j\];/acc[o] = vec4<f32>(vec4<Stage>(acc[o] + ar * bv[j]));/' \
    '--test it -- matmul::'
  mutation attention-p-f16 shaders/attention_flash.wgsl \
    's/f_s\[rr \* SS \+ j\] = pv;/f_s[rr * SS + j] = f32({{QKV_T}}(pv));/' \
    '--test it -- attention::flash_forward_and_backward attention::mixed_storage'
  mutation gelu-f16-near-zero shaders/elementwise.wgsl \
    's/gf_out\[i\] = \{\{OUT_T\}\}\(gelu\(f32\(gf_inp\[i\]\)\)\);/let x0 = f32(gf_inp[i]); let is_half = f32({{OUT_T}}(x0 * 0.0 + 1.0001)) == 1.0; gf_out[i] = {{OUT_T}}(gelu(x0) + select(0.0, 0.004, is_half \&\& abs(x0) < 0.01));/' \
    '--test it -- elementwise::gelu_forward'
  mutation wte-piece-1-not-updated src/graph/gpt.rs \
    's/\.filter\(\|\(_, p\)\| p\.buffer == k\)/.filter(|(j, p)| p.buffer == k \&\& !(id == crate::model::ParamId::Wte \&\& *j == 1))/' \
    '--test it -- train::split_storage'
  mutation classifier-input-gradient-unsplit src/graph/gpt.rs \
    's/let len = matmul_backward_input_scratch_len/let len = 0 * matmul_backward_input_scratch_len/' \
    '--test it -- train::gpt2_124m'
  mutation hellaswag-highest-loss src/eval/hellaswag.rs \
    's/\.min_by\(\|&a, &b\| l\[a\]\.total_cmp/.max_by(|&a, &b| l[a].total_cmp/' \
    '--test it -- evaluation::hellaswag'
  mutation data-parallel-sum-not-mean src/train/trainer/mod.rs \
    's/            s\.tokens_per_step\(\),\n        \);/            s.tokens_per_step() \/ s.ranks,\n        );/' \
    '--workspace --features wgpt/mpi --test mpi -- two_ranks'
  mutation queued-overflow-scale-kept shaders/optimizer.wgsl \
    's/rescale\(&s, false\);/\/\/ the scale kept after an overflow/' \
    '--test it -- train::queued_steps'
  mutation step-state-upper-clamp-off shaders/optimizer.wgsl \
    's/if \(\(\*s\)\.scale \* 2\.0 > MAX_SCALE\)/if ((*s).scale * 2.0 > MAX_SCALE * 2.0)/' \
    '--test it -- optimizer::step_state'
  mutation resume-without-first-moments src/train/trainer/weights.rs \
    's/\n\s*self\.weights\.m\.upload\(&self\.gpu, &self\.layout, m\)\?;//' \
    '--test it -- faults::'
  mutation resume-without-rng-state src/train/trainer/weights.rs \
    's/\n\s*self\.rng = Rng::from_state\(s\.rng_state\);//' \
    '--test it -- faults::'
  mutation undeclared-binding-allowed src/graph/mod.rs \
    's/if !self\.declared\.contains\(&id\)/if false \&\& !self.declared.contains(\&id)/' \
    '--lib -- graph::'
  mutation poll-before-the-step-finished src/train/trainer/ring.rs \
    's/Ok\(self\.slots\[p\.slot\]\.mapped\.load\(Ordering::Acquire\) != MAPPING\)/Ok(true)/' \
    '--test it -- train::queued_steps'
}

if [ "${1:-}" = "--list" ]; then
  mutation() { echo "$1"; }
  mutations
  exit 0
fi

# The environment of scripts/test.sh.
. scripts/test-env.sh
# One build folder for every scratch copy: the dependencies are built once.
export CARGO_TARGET_DIR=$root/target/mutants

scratch=$(mktemp -d /tmp/wgpt-mutants.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
results=()
status=0
wanted=("$@")
mutation() {
  local name=$1 file=$2 subst=$3 args=$4 verdict before failed
  if [ "${#wanted[@]}" -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then
    return 0
  fi
  local copy=$scratch/$name log=$scratch/$name.log
  mkdir -p "$copy"
  git archive HEAD | tar -x -C "$copy"
  before=$(sha256sum "$copy/$file" 2>/dev/null || true)
  perl -0pi -e "$subst" "$copy/$file" 2>/dev/null || true
  if [ -z "$before" ] || [ "$before" = "$(sha256sum "$copy/$file")" ]; then
    verdict=stale
  else
    echo "== $name: $file mutated; cargo test --locked $args"
    local argv build
    read -r -a argv <<<"$args"
    read -r -a build <<<"${args%% -- *}"
    if ! (cd "$copy" && cargo test --locked --no-run "${build[@]}" >"$log" 2>&1); then
      verdict="no build"
    elif (cd "$copy" && cargo test --locked "${argv[@]}" >>"$log" 2>&1); then
      verdict=MISSED
    else
      verdict=caught
      failed=$(grep -m1 -oE '^test [^ ]+ \.\.\. FAILED' "$log" | sed 's/^test //; s/ \.\.\. FAILED//' || true)
      [ -n "$failed" ] && verdict="caught ($failed)"
    fi
  fi
  [[ $verdict == caught* ]] || status=1
  results+=("$(printf '%-30s %s' "$name" "$verdict")")
  rm -rf "$copy"
}
mutations

printf '\n%-30s %s\n' mutation verdict
printf '%s\n' "${results[@]}"
exit "$status"
