//! The binaries end to end: the log-line contract, metrics, checkpoint + resume through the
//! command line, Hugging Face export, and bad input giving clear errors with a non-zero exit.

use crate::common::SMALL_RUN;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headless-train"))
        .args(args)
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "vulkan".into()),
        )
        .output()
        .expect("run headless-train")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn losses(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("step "))
        .map(|l| l.split(" | ").nth(1).unwrap().to_string())
        .collect()
}

#[test]
fn log_lines_follow_the_contract() {
    let dir = tmp("log");
    let metrics = dir.join("m.jsonl");
    let mut args = SMALL_RUN.to_vec();
    args.extend(["--steps", "3", "--metrics", metrics.to_str().unwrap()]);
    let o = train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("loaded 354013 tokens\n"), "{out}");
    assert!(out.contains("adapter: "));
    assert!(out.contains("num decayed parameter tensors: 6"), "{out}");
    let steps: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 3);
    for (i, l) in steps.iter().enumerate() {
        // step {step:4} | loss: {:.6} | lr {:.4e} | norm: {:.4} | dt: {:.2}ms | tok/sec: {:.2}
        let f: Vec<&str> = l.split(" | ").collect();
        assert_eq!(f.len(), 6, "{l}");
        assert_eq!(f[0], format!("step {i:4}"));
        let loss = f[1].strip_prefix("loss: ").unwrap();
        assert_eq!(loss.split('.').nth(1).unwrap().len(), 6, "{l}");
        let lr: f64 = f[2].strip_prefix("lr ").unwrap().parse().unwrap();
        assert!((lr - 6e-4 * (i + 1) as f64 / 10.0).abs() < 1e-9, "{l}");
        assert!(
            f[3].starts_with("norm: ") && f[3].split('.').nth(1).unwrap().len() == 4,
            "{l}"
        );
        assert!(f[4].starts_with("dt: ") && f[4].ends_with("ms"), "{l}");
        assert!(f[5].starts_with("tok/sec: "), "{l}");
    }
    let m = std::fs::read_to_string(&metrics).unwrap();
    let rows: Vec<serde_json::Value> = m
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["step"], 2);
    let logged: f64 = losses(&out)[2]
        .strip_prefix("loss: ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((rows[2]["loss"].as_f64().unwrap() - logged).abs() < 1e-5);
}

#[test]
fn stop_checkpoint_and_resume_reproduce_the_uninterrupted_losses() {
    let dir = tmp("resume");
    let ck = dir.join("ck");
    let mut whole = SMALL_RUN.to_vec();
    whole.extend(["--steps", "6"]);
    let o = train(&whole);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = losses(&stdout(&o));
    let mut first = whole.clone();
    first.extend([
        "--stop-after",
        "3",
        "--checkpoint-dir",
        ck.to_str().unwrap(),
    ]);
    let o1 = train(&first);
    assert!(o1.status.success(), "{}", stderr(&o1));
    assert!(ck.join("ckpt_step00000003.safetensors").exists());
    let o2 = train(&["--resume", ck.to_str().unwrap()]);
    assert!(o2.status.success(), "{}", stderr(&o2));
    let mut got = losses(&stdout(&o1));
    got.extend(losses(&stdout(&o2)));
    assert_eq!(got, want);
}

#[test]
fn old_checkpoints_are_pruned_and_an_unwritable_folder_is_refused_before_training() {
    let dir = tmp("keep");
    let ck = dir.join("ck");
    let mut args = SMALL_RUN.to_vec();
    let ck_s = ck.to_str().unwrap().to_string();
    args.extend(["--steps", "8", "--stop-after", "5"]);
    args.extend(["--checkpoint-every", "1", "--keep-last", "2"]);
    args.extend(["--checkpoint-dir", &ck_s]);
    let steps_kept = || -> Vec<usize> {
        let all = wgpt::checkpoint::list_checkpoints(&ck).unwrap();
        all.into_iter().map(|(s, _)| s).collect()
    };
    let o = train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps_kept(), [5, 4]);
    // A setting given on resume that differs from the checkpoint's is refused, named.
    let o = train(&["--resume", &ck_s, "-B", "3"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--batch-size: the checkpoint's run used 2, not 3"),
        "{}",
        stderr(&o)
    );
    // Resumed from step 5 (the run's settings come from the checkpoint) and pruned to one:
    // the resumed-from checkpoint stays.
    let o = train(&[
        "--resume",
        &ck_s,
        "--checkpoint-every",
        "1",
        "--keep-last",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(steps_kept(), [8, 5]);
    // A folder below a regular file: refused at start-up, no step trained.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let bad = file.join("ck");
    let mut args = SMALL_RUN.to_vec();
    args.extend(["--steps", "2", "--checkpoint-dir", bad.to_str().unwrap()]);
    let o = train(&args);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("checkpoints cannot be written here"),
        "{}",
        stderr(&o)
    );
    assert!(losses(&stdout(&o)).is_empty(), "no step before the refusal");
}

#[test]
fn export_with_zero_steps_converts_the_initial_weights() {
    let dir = tmp("export");
    let hf = dir.join("hf");
    let mut args = SMALL_RUN.to_vec();
    args.extend(["--steps", "0", "--export-hf", hf.to_str().unwrap()]);
    let o = train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = wgpt::checkpoint::hf::import(&hf).unwrap();
    assert_eq!(c.config.n_embd, 32);
    // and the export trains on: --init-from the exported folder
    let o = train(&[
        "--init-from",
        hf.to_str().unwrap(),
        "-B",
        "2",
        "-T",
        "16",
        "--steps",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(losses(&stdout(&o)).len(), 1);
}

/// prepare-data, then training on its shards with validation every 2 steps, in an environment
/// without a desktop session (no start-up line from Mesa's device-selection layer).
#[test]
fn shards_from_prepare_data_train_with_validation() {
    let dir = tmp("shards");
    let shards = dir.join("shards");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    let o = Command::new(env!("CARGO_BIN_EXE_prepare-data"))
        .args([corpus.to_str().unwrap(), "--out", shards.to_str().unwrap()])
        .args(["--shard-tokens", "100000"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("wrote 4 shards") && out.contains("354014 tokens"),
        "{out}"
    );
    let mut args = SMALL_RUN.to_vec();
    let shards_s = shards.to_str().unwrap().to_string();
    args.extend(["--data", &shards_s, "--steps", "3", "--shuffle"]);
    args.extend(["--val-every", "2", "--val-steps", "2"]);
    let o = Command::new(env!("CARGO_BIN_EXE_headless-train"))
        .args(&args)
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "vulkan".into()),
        )
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("loaded 254014 tokens\ndata: 3 training shards in "),
        "{out}"
    );
    assert!(out.contains("validation shard of 100000 tokens"), "{out}");
    let val: Vec<&str> = out.lines().filter(|l| l.contains("val loss")).collect();
    assert_eq!(val.len(), 3, "{out}");
    for (l, step) in val.iter().zip([0, 2, 3]) {
        // step {step:4} | val loss: {loss:.6}
        let (head, loss) = l.split_once(" | val loss: ").unwrap();
        assert_eq!(head, format!("step {step:4}"));
        assert!(loss.parse::<f64>().unwrap() > 0.0);
        assert_eq!(loss.len() - loss.find('.').unwrap(), 7, "{l}");
    }
    let steps = out.lines().filter(|l| l.contains(" | loss: ")).count();
    assert_eq!(steps, 3);
    assert!(!stderr(&o).contains("XDG_RUNTIME_DIR"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).ok();
}

/// The disk filling up during a checkpoint save (a file-size limit on the process, with the
/// signal it raises ignored, so that writes fail as on a full disk): the run ends with a clear
/// error and a non-zero exit, leaves no partial file, and the last complete checkpoint resumes.
#[test]
fn a_full_disk_during_a_save_ends_the_run_cleanly() {
    let dir = tmp("full");
    let ck = dir.join("ck");
    let ck_s = ck.to_str().unwrap().to_string();
    let mut args = SMALL_RUN.to_vec();
    args.extend([
        "--steps",
        "4",
        "--stop-after",
        "2",
        "--checkpoint-every",
        "2",
    ]);
    args.extend(["--checkpoint-dir", &ck_s]);
    let o = train(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Resume with writes limited to 4 MiB: the checkpoint of step 4 (some 20 MB) cannot be
    // written.
    let script = format!(
        "trap '' XFSZ; ulimit -f 4096; exec '{}' --resume '{}'",
        env!("CARGO_BIN_EXE_headless-train"),
        ck_s
    );
    let o = Command::new("bash")
        .args(["-c", &script])
        .env(
            "WGPU_BACKEND",
            std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "vulkan".into()),
        )
        .env("WGPT_CACHE_DIR", "")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "the run should fail: {}", stdout(&o));
    assert!(
        err.contains("ckpt_step00000004") && err.contains("the checkpoint was not written"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let steps = stdout(&o)
        .lines()
        .filter(|l| l.contains(" | loss: "))
        .count();
    assert_eq!(steps, 2, "the steps ran before the save");
    let files: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["ckpt_step00000002.safetensors"],
        "partial files left: {files:?}"
    );
    // Without the limit the run resumes from step 2 and finishes.
    let o = train(&["--resume", &ck_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ckpt_step00000004.safetensors"));
    std::fs::remove_dir_all(&dir).ok();
}

fn expect_error(args: &[&str], needle: &str) -> String {
    let o = train(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err.lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .unwrap_or("")
        .to_string()
}

#[test]
fn bad_input_gives_a_clear_error_and_a_nonzero_exit() {
    let dir = tmp("bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.join("bin.dat");
    std::fs::write(&binary, [0u8, 159, 146, 150, 255]).unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "a few words only").unwrap();
    let notdir = dir.join("nothing-here");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--data".into(), p(&dir.join("missing.txt"))],
            "missing.txt",
        ),
        (vec!["--data".into(), p(&empty)], "empty"),
        (vec!["--data".into(), p(&binary)], "not UTF-8"),
        (vec!["--data".into(), p(&short)], "B*T+1"),
        (vec!["-T".into(), "17".into()], "block size"),
        (vec!["--n-head".into(), "3".into()], "divisible"),
        (vec!["--vocab-size".into(), "1000".into()], "tokenizer"),
        (vec!["-B".into(), "0".into()], "batch-size"),
        (vec!["--max-lr".into(), "0".into()], "max-lr"),
        (vec!["--max-lr".into(), "-1e-3".into()], "max-lr"),
        (vec!["--resume".into(), p(&notdir)], "nothing-here"),
        (vec!["--init-from".into(), p(&notdir)], "nothing-here"),
        (vec!["--preset".into(), "gpt5".into()], "unknown preset"),
        // naive attention's scores of 512 x 2 heads x 1024 x 1024 f32 (4 GiB) exceed any
        // adapter's binding
        (
            vec![
                "--block-size".into(),
                "1024".into(),
                "-T".into(),
                "1024".into(),
                "-B".into(),
                "512".into(),
                "--attention".into(),
                "naive".into(),
            ],
            "--attention flash",
        ),
        // 200 layers 2048 wide: 10B parameters, some 190 GB with gradients and moments
        (
            vec![
                "--n-layer".into(),
                "200".into(),
                "--n-embd".into(),
                "2048".into(),
            ],
            "device memory",
        ),
        (vec!["--grad-accum".into(), "0".into()], "grad-accum"),
        (vec!["--data".into(), p(&dir)], "no token shards"),
        (
            vec!["--val-every".into(), "2".into()],
            "--val-every: validation needs a folder of shards",
        ),
        (
            vec!["--shuffle".into()],
            "shuffling needs a folder of shards",
        ),
        (
            vec!["--eval-every".into(), "2".into()],
            "--eval-every: needs a HellaSwag file",
        ),
        (vec!["--hellaswag".into(), p(&short)], "short.txt: line 1"),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = SMALL_RUN.iter().map(|s| s.to_string()).collect();
        args.extend(["--steps".into(), "1".into()]);
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let line = expect_error(&refs, needle);
        eprintln!("{:?} -> {line}", &refs[SMALL_RUN.len() + 2..]);
    }
}

/// `--dry-run` prints the memory plan with every buffer and exits without a step; the plan of a
/// GPT-2 124M run shows its storage and classifier chunks.
#[test]
fn dry_run_prints_the_plan_and_trains_nothing() {
    let o = train(&["--preset", "gpt2", "-B", "4", "-T", "64", "--dry-run"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(losses(&out).is_empty(), "a dry run trains nothing: {out}");
    let memory = out
        .lines()
        .find(|l| l.starts_with("memory: params "))
        .expect("the memory line");
    for part in [
        "| grads ",
        "| moments ",
        "| activations ",
        "| classifier ",
        "| total ",
    ] {
        assert!(memory.contains(part), "{memory}");
    }
    assert!(
        out.contains("classifier: logits in 1 chunk of 256 rows x 50304"),
        "{out}"
    );
    assert!(out.contains("params f32 buffer 0"), "{out}");
    assert!(out.contains("adam v f32 buffer 0"), "{out}");
    assert!(out.contains("the run fits the adapter"), "{out}");
    // A plan beyond the adapter's memory is printed, then refused.
    let o = train(&[
        "--n-layer",
        "200",
        "--n-embd",
        "2048",
        "--n-head",
        "16",
        "--block-size",
        "64",
        "-B",
        "1",
        "-T",
        "64",
        "--dry-run",
    ]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("params f32 buffer"), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("device memory") && err.contains("use a smaller model"),
        "{err}"
    );
}
