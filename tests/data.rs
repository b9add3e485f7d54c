//! Tokenisation and loading of the corpora against their known token counts.

use std::path::{Path, PathBuf};
use wgpt::data::load_tokens;

#[test]
fn bundled_corpus_has_its_known_token_count() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    assert_eq!(load_tokens(&path).unwrap().len(), 354_013);
}

#[test]
fn tiny_shakespeare_has_338025_tokens() {
    // Not shipped with the project; found beside it (../shared/data) or through an env var.
    let candidates = [
        std::env::var_os("WGPT_TINYSHAKESPEARE").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/tinyshakespeare.txt")),
    ];
    match candidates.into_iter().flatten().find(|p| p.exists()) {
        Some(p) => assert_eq!(load_tokens(&p).unwrap().len(), 338_025),
        None => eprintln!("tinyshakespeare.txt not found (set WGPT_TINYSHAKESPEARE): skipped"),
    }
}

#[test]
fn bad_data_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("wgpt-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.txt");
    let e = load_tokens(&missing).unwrap_err().to_string();
    assert!(e.contains("missing.txt") && e.contains("--data"), "{e}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_tokens(&empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    let binary = dir.join("binary.bin");
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x81]).unwrap();
    assert!(load_tokens(&binary)
        .unwrap_err()
        .to_string()
        .contains("not UTF-8"));
    std::fs::remove_dir_all(&dir).ok();
}
