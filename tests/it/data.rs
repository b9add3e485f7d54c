//! Tokenisation and loading of the corpora against their known token counts.

use std::path::Path;
use wgpt::data::load_tokens;

#[test]
fn bundled_corpus_has_its_known_token_count() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    assert_eq!(load_tokens(&path).unwrap().len(), 354_013);
}

#[test]
fn gpt2_encoding_gives_the_published_token_ids() {
    // GPT-2's own encoder's ids (the `gpt2` encoding's examples): "Hello" 15496, "hello" 31373,
    // " world" 995, "The" 464, " the" 262.
    let tk = wgpt::data::Tokenizer::gpt2();
    assert_eq!(tk.encode("Hello world"), vec![15496, 995]);
    assert_eq!(tk.encode("hello world"), vec![31373, 995]);
    assert_eq!(tk.encode("The end of the"), vec![464, 886, 286, 262]);
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
