//! Data-parallel training through MPI, end to end: `mpirun -np 2 headless-train` against one
//! process with `--grad-accum 2` over the same tokens, the ranks' weights compared, a 2-rank
//! checkpoint resumed by 2 ranks and by 1, and a failing rank (or ranks started differently)
//! ending the job.
//!
//! Needs the `mpi` feature and Open MPI's `mpirun` (`bash scripts/test.sh` installs it):
//! `cargo test --features mpi --test mpi`.

mod common;
use common::SMALL_RUN;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The model and batch of every run here (with [`SMALL_RUN`]): tiny, f32, 2 x 16 tokens per
/// rank and micro-batch.
const RUN: &[&str] = &["--precision", "f32", "--steps", "4", "--warmup-steps", "2"];

/// One job at a time: the jobs share the machine's cores.
static JOBS: Mutex<()> = Mutex::new(());

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-mpi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn command(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env(
        "WGPU_BACKEND",
        std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "vulkan".into()),
    )
    // CI containers run as root, which mpirun refuses unless told.
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

/// headless-train in one process.
fn single(args: &[&str]) -> Output {
    command(env!("CARGO_BIN_EXE_headless-train"))
        .args(SMALL_RUN)
        .args(RUN)
        .args(args)
        .output()
        .expect("run headless-train")
}

/// `mpirun -np 2 headless-train ...` (oversubscribed: CI has 2 cores and a software GPU).
fn two_ranks(args: &[&str]) -> Output {
    command("mpirun")
        .args(["-np", "2", "--oversubscribe"])
        .arg(env!("CARGO_BIN_EXE_headless-train"))
        .args(SMALL_RUN)
        .args(RUN)
        .args(args)
        .output()
        .expect("run mpirun (install Open MPI: apt-get install openmpi-bin libopenmpi-dev)")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// (step, `key`) of every step line of a metrics file.
fn column(metrics: &Path, key: &str) -> Vec<(u64, f32)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v[key].as_f64().unwrap() as f32))
        .collect()
}

/// (step, loss) of every step line of a metrics file.
fn losses(metrics: &Path) -> Vec<(u64, f32)> {
    column(metrics, "loss")
}

/// (step, gradient norm before clipping) of every step line of a metrics file.
fn norms(metrics: &Path) -> Vec<(u64, f32)> {
    column(metrics, "norm")
}

/// The checksums of the "weights identical on N ranks" lines, by step.
fn checksums(out: &str) -> Vec<(usize, String)> {
    out.lines()
        .filter(|l| l.contains("| weights identical on 2 ranks: checksum "))
        .map(|l| {
            let step = l["step".len()..].split('|').next().unwrap().trim();
            (
                step.parse().unwrap(),
                l.rsplit(' ').next().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_close(what: &str, got: &[(u64, f32)], want: &[(u64, f32)], rel: f32) {
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        want.iter().map(|w| w.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for (g, w) in got.iter().zip(want) {
        let d = (g.1 - w.1).abs() / w.1.abs();
        eprintln!(
            "{what}: step {} {} vs {} (relative difference {d:.2e})",
            g.0, g.1, w.1
        );
        // A NaN fails too.
        assert!(d <= rel, "{what}: step {}: {} vs {}", g.0, g.1, w.1);
    }
}

/// The weights and both Adam moments of two final checkpoints within `rel` (max-norm relative).
fn assert_same_training(what: &str, got: &Path, want: &Path, steps: usize, rel: f32) {
    let (_, want) = wgpt::checkpoint::load_newest(want).unwrap();
    let (_, got) = wgpt::checkpoint::load_newest(got).unwrap();
    assert_eq!(want.state.as_ref().map(|s| s.step), Some(steps));
    assert_eq!(got.state.as_ref().map(|s| s.step), Some(steps));
    let (m1, v1) = want.moments.as_ref().unwrap();
    let (m2, v2) = got.moments.as_ref().unwrap();
    common::assert_close(&format!("{what}: weights"), &got.params, &want.params, rel);
    common::assert_close(&format!("{what}: first moments"), m2, m1, rel);
    common::assert_close(&format!("{what}: second moments"), v2, v1, rel);
}

#[test]
fn two_ranks_train_as_one_process_with_grad_accum_2_and_resume_exactly() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp("train");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();

    // One process, two micro-batches per step: the tokens the two ranks share.
    let o = single(&[
        "--grad-accum",
        "2",
        "--metrics",
        &path("one.jsonl"),
        "--checkpoint-dir",
        &path("ck-single"),
    ]);
    let out = ok(&o);
    assert!(out.contains("grad accum 2 | 64 tokens/step"), "{out}");
    let one = losses(&dir.join("one.jsonl"));
    assert_eq!(one.len(), 4);

    // Two ranks, one micro-batch each, uninterrupted.
    let o = two_ranks(&[
        "--metrics",
        &path("two.jsonl"),
        "--checkpoint-dir",
        &path("ck-full"),
        "--checkpoint-every",
        "2",
    ]);
    let out = ok(&o);
    assert!(
        out.contains("data parallel: 2 ranks x B 2 x T 16 x grad accum 1 = 64 tokens per step"),
        "{out}"
    );
    // Rank 0 alone prints and writes the metrics.
    assert_eq!(out.matches("loaded ").count(), 1, "{out}");
    assert_eq!(out.matches("| loss: ").count(), 4, "{out}");
    let two = losses(&dir.join("two.jsonl"));
    let rows = std::fs::read_to_string(dir.join("two.jsonl")).unwrap();
    assert!(
        rows.lines().all(|l| l.contains("\"all_reduce_ms\":")),
        "{rows}"
    );
    // The same tokens and the same arithmetic but for the order of one sum per gradient: the
    // same losses and gradient norms. The norm is taken before clipping, so a gradient reduced
    // wrongly (summed where it should be averaged) shows in it even where clipping (on here,
    // at 1) scales it back to the same update.
    assert_close("2 ranks vs 1 process with grad accum 2", &two, &one, 1e-6);
    assert_close(
        "2 ranks vs 1 process with grad accum 2: gradient norm",
        &norms(&dir.join("two.jsonl")),
        &norms(&dir.join("one.jsonl")),
        1e-6,
    );
    // Every rank's weights are checked against the others' at each checkpoint and the end.
    let sums = checksums(&out);
    assert_eq!(
        sums.iter().map(|s| s.0).collect::<Vec<_>>(),
        [2, 4],
        "{out}"
    );
    eprintln!("weights checksums on both ranks: {sums:?}");
    // And they are the single process's weights and Adam moments after the 4 steps, within
    // 1e-6 (max-norm relative): the same gradients summed in another order (the single
    // process accumulates the second micro-batch into the first inside the kernels, the ranks
    // add two finished gradients), which moves the weights by rounding only. A gradient
    // reduced wrongly (not averaged, a rank's share missing) moves the moments by their size.
    assert_same_training(
        "2 ranks vs 1 process with grad accum 2 after 4 steps",
        &dir.join("ck-full"),
        &dir.join("ck-single"),
        4,
        1e-6,
    );

    // The same pair of runs without clipping, for 2 steps: the gradient reaches AdamW as
    // reduced, so a sum where a mean belongs doubles the first moment (and quadruples the
    // second) whatever the norm.
    let no_clip = ["--grad-clip", "0", "--steps", "2"];
    let o = single(
        &[
            &no_clip[..],
            &[
                "--grad-accum",
                "2",
                "--metrics",
                &path("one-unclipped.jsonl"),
                "--checkpoint-dir",
                &path("ck-single-unclipped"),
            ],
        ]
        .concat(),
    );
    ok(&o);
    let o = two_ranks(
        &[
            &no_clip[..],
            &[
                "--metrics",
                &path("two-unclipped.jsonl"),
                "--checkpoint-dir",
                &path("ck-unclipped"),
            ],
        ]
        .concat(),
    );
    ok(&o);
    let what = "2 ranks vs 1 process with grad accum 2, unclipped";
    let (one_u, two_u) = (
        dir.join("one-unclipped.jsonl"),
        dir.join("two-unclipped.jsonl"),
    );
    assert_eq!(losses(&two_u).len(), 2);
    assert_close(what, &losses(&two_u), &losses(&one_u), 1e-6);
    assert_close(
        &format!("{what}: gradient norm"),
        &norms(&two_u),
        &norms(&one_u),
        1e-6,
    );
    assert_same_training(
        what,
        &dir.join("ck-unclipped"),
        &dir.join("ck-single-unclipped"),
        2,
        1e-6,
    );

    // Stopped after 2 steps (a checkpoint at step 2), then resumed by 2 ranks: the same losses
    // and the same weights, bit for bit. These two runs reduce the gradients in buckets of
    // 10 KiB (the uninterrupted one: all in one), each while the backward of earlier layers
    // runs, which changes nothing but the time.
    let o = two_ranks(&[
        "--bucket-mb",
        "0.01",
        "--profile",
        "--checkpoint-dir",
        &path("ck"),
        "--stop-after",
        "2",
        "--metrics",
        &path("first.jsonl"),
    ]);
    let out = ok(&o);
    assert_eq!(losses(&dir.join("first.jsonl")), two[..2]);
    let profile = out
        .lines()
        .find(|l| l.starts_with("all-reduce per step: "))
        .unwrap_or_else(|| panic!("{out}"));
    eprintln!("{profile}");
    assert!(profile.contains(" MB of gradients in "), "{profile}");
    copy_dir(&dir.join("ck"), &dir.join("ck-one"));
    let o = two_ranks(&[
        "--resume",
        &path("ck"),
        "--bucket-mb",
        "0.01",
        "--metrics",
        &path("resumed.jsonl"),
    ]);
    let out = ok(&o);
    assert_eq!(losses(&dir.join("resumed.jsonl")), two[2..]);
    assert_eq!(checksums(&out).last(), sums.last(), "{out}");

    // One process resumes the 2-rank checkpoint with two micro-batches per step.
    let o = single(&[
        "--resume",
        &path("ck-one"),
        "--metrics",
        &path("one-resumed.jsonl"),
    ]);
    let out = ok(&o);
    assert!(out.contains("grad accum 2 | 64 tokens/step"), "{out}");
    assert_close(
        "1 process resuming a 2-rank checkpoint",
        &losses(&dir.join("one-resumed.jsonl")),
        &two[2..],
        1e-6,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failing_rank_ends_the_job_with_a_clear_message() {
    let _job = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmp("fail");
    // A checkpoint folder that cannot be made: rank 0, which alone writes checkpoints, fails
    // at start-up while rank 1 goes on to its first all-reduce; the job must end, not hang.
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let ck = blocker.join("ck");
    let start = std::time::Instant::now();
    let o = two_ranks(&["--checkpoint-dir", ck.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("error: rank 0 of 2"), "{err}");
    assert!(err.contains("--checkpoint-dir"), "{err}");
    assert!(
        start.elapsed().as_secs() < 300,
        "the job took {:?} to end",
        start.elapsed()
    );

    // Ranks started with different settings are refused before the first step.
    let exe = env!("CARGO_BIN_EXE_headless-train");
    let o = command("mpirun")
        .args(["--oversubscribe", "-np", "1", exe])
        .args(SMALL_RUN)
        .args(RUN)
        .args([":", "-np", "1", exe])
        .args(SMALL_RUN)
        .args(RUN)
        .args(["--seed", "7"])
        .output()
        .expect("run mpirun");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("rank 1 was started with other settings, data or checkpoint than rank 0"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
