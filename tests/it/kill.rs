//! A process killed while it writes a checkpoint leaves the previous checkpoints intact and
//! loadable, and training resumes from the newest complete one.

use crate::common::SMALL_RUN;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn backend() -> String {
    std::env::var("WGPU_BACKEND").unwrap_or_else(|_| "vulkan".into())
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn killed_during_save_keeps_the_previous_checkpoint_and_resumes() {
    let dir = std::env::temp_dir().join(format!("wgpt-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args: Vec<&str> = SMALL_RUN.to_vec();
    let d = dir.to_str().unwrap();
    args.extend([
        "--steps",
        "400",
        "--checkpoint-dir",
        d,
        "--checkpoint-every",
        "1",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_headless-train"))
        .args(&args)
        .env("WGPU_BACKEND", backend())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for at least one finished checkpoint, then for a save to be in progress (its
    // temporary file exists), and kill the process right then.
    let start = Instant::now();
    let mut killed_mid_save = false;
    while start.elapsed() < Duration::from_secs(240) {
        let done = wgpt::checkpoint::list_checkpoints(&dir)
            .map(|v| v.len())
            .unwrap_or(0);
        if done >= 1 && !temp_files(&dir).is_empty() {
            child.kill().unwrap();
            killed_mid_save = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the trainer ended before it could be killed: {status}");
        }
        // A save of this model takes a few milliseconds and one comes every step: polling
        // each millisecond meets one soon, without taking a core from the trainer.
        std::thread::sleep(Duration::from_millis(1));
    }
    child.wait().unwrap();
    assert!(killed_mid_save, "never saw a save in progress");
    let leftovers = temp_files(&dir);
    eprintln!("killed with {leftovers:?} half-written");
    // Every file under a checkpoint's name is complete.
    let all = wgpt::checkpoint::list_checkpoints(&dir).unwrap();
    assert!(!all.is_empty());
    for (step, path) in &all {
        let c = wgpt::checkpoint::Checkpoint::load(path)
            .unwrap_or_else(|e| panic!("checkpoint {step}: {e}"));
        assert_eq!(c.state.unwrap().step, *step);
    }
    let newest = all[0].0;
    // Training resumes from the newest complete checkpoint.
    let out = Command::new(env!("CARGO_BIN_EXE_headless-train"))
        .args(["--resume", d, "--stop-after", "2"])
        .env("WGPU_BACKEND", backend())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().find(|l| l.starts_with("step ")).unwrap();
    assert!(
        first.starts_with(&format!("step {newest:4} |")),
        "resumed at '{first}', newest checkpoint {newest}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
