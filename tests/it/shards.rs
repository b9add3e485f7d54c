//! Token shards: preparation from text and JSON lines, the memory-mapped loader against the
//! text path, shuffling, exact resume across shard boundaries, and bad inputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use wgpt::data::prepare::{prepare, PrepareOptions};
use wgpt::data::shard::{write_shard, ShardSet, HEADER_BYTES};
use wgpt::data::{load_tokens, Corpus, DataLoader, LoaderState, Tokenizer, EOT};

fn corpus_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt")
}

/// A fresh folder per test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-shards-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shard_tokens(path: &Path) -> Vec<u32> {
    let set_dir = path.parent().unwrap();
    let set = ShardSet::open(set_dir).unwrap();
    let shard = std::iter::once(&set.val)
        .chain(set.train.iter())
        .find(|s| s.path == path)
        .unwrap();
    let mut out = Vec::new();
    shard.read_into(0..shard.len(), &mut out).unwrap();
    out
}

/// All tokens of a prepared folder, in shard order (validation first).
fn all_tokens(dir: &Path) -> Vec<u32> {
    let set = ShardSet::open(dir).unwrap();
    let mut out = Vec::new();
    for s in std::iter::once(&set.val).chain(set.train.iter()) {
        s.read_into(0..s.len(), &mut out).unwrap();
    }
    out
}

#[test]
fn a_text_file_prepares_into_its_own_tokens_in_shards() {
    let dir = temp_dir("text");
    let mut o = PrepareOptions::new(dir.join("out"));
    o.shard_tokens = 60_000;
    let r = prepare(&[corpus_path()], &o).unwrap();
    let want = load_tokens(&corpus_path()).unwrap();
    // One document: <|endoftext|> then the text's tokens, exactly as encoding it whole.
    assert_eq!(r.tokens as usize, want.len() + 1);
    assert_eq!(r.documents, 1);
    assert_eq!(r.shards.len(), (want.len() + 1).div_ceil(60_000));
    assert_eq!(r.val_tokens, 60_000);
    let got = all_tokens(&dir.join("out"));
    assert_eq!(got[0], EOT);
    assert!(
        got[1..] == want[..],
        "the shards' tokens differ from the text's"
    );
    for (i, p) in r.shards.iter().enumerate() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let want_name = if i == 0 {
            "val_000000.bin".to_string()
        } else {
            format!("train_{i:06}.bin")
        };
        assert_eq!(name, want_name);
    }
    // Again, into the same folder with larger shards: identical tokens, and the shards of
    // the first run that this one did not write are gone.
    let first: Vec<Vec<u8>> = r.shards.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let again = prepare(&[corpus_path()], &o).unwrap();
    let second: Vec<Vec<u8>> = again
        .shards
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(first == second, "a re-run wrote different shards");
    o.shard_tokens = 200_000;
    let fewer = prepare(&[corpus_path()], &o).unwrap();
    assert_eq!(fewer.shards.len(), 2);
    assert_eq!(ShardSet::open(&dir.join("out")).unwrap().shard_count(), 2);
    assert!(all_tokens(&dir.join("out"))[1..] == want[..]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn json_lines_and_folders_become_documents_in_path_order() {
    let dir = temp_dir("jsonl");
    let input = dir.join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::write(
        input.join("a.jsonl"),
        "{\"text\": \"Hello world\", \"id\": 1}\n\n{\"text\": \"Second document.\\nWith two lines.\"}\n",
    )
    .unwrap();
    std::fs::write(input.join("sub/b.txt"), "A plain text file.").unwrap();
    std::fs::write(input.join(".hidden.txt"), "left out").unwrap();
    let mut o = PrepareOptions::new(dir.join("out"));
    o.shard_tokens = 8;
    let r = prepare(&[input], &o).unwrap();
    let t = Tokenizer::gpt2();
    let mut want = Vec::new();
    for doc in [
        "Hello world",
        "Second document.\nWith two lines.",
        "A plain text file.",
    ] {
        want.push(EOT);
        want.extend(t.encode(doc));
    }
    assert_eq!(r.documents, 3);
    assert_eq!(all_tokens(&dir.join("out")), want);
    assert_eq!(shard_tokens(&r.shards[0]).len(), 8);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_are_refused_with_the_file_named_and_nothing_written() {
    let dir = temp_dir("bad-input");
    let out = dir.join("out");
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": oops}\n").unwrap();
    let e = prepare(std::slice::from_ref(&bad), &PrepareOptions::new(&out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    let no_field = dir.join("nofield.jsonl");
    std::fs::write(&no_field, "{\"body\": \"x\"}\n").unwrap();
    let e = prepare(&[no_field], &PrepareOptions::new(&out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--text-field") && e.contains("line 1"), "{e}");
    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [b'a', 0xff, 0xfe, 0]).unwrap();
    let e = prepare(&[binary], &PrepareOptions::new(&out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("binary.txt") && e.contains("UTF-8"), "{e}");
    let e = prepare(&[dir.join("missing")], &PrepareOptions::new(&out))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing"), "{e}");
    // The output folder holds nothing: no shard, no temporary folder.
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_shards_are_refused_with_the_file_named() {
    let dir = temp_dir("bad-shards");
    let err = |d: &Path| match ShardSet::open(d) {
        Ok(_) => panic!("{} opened", d.display()),
        Err(e) => e.to_string(),
    };
    let e = err(&dir);
    assert!(
        e.contains("no token shards") && e.contains("prepare-data"),
        "{e}"
    );
    write_shard(&dir.join("val_000000.bin"), &[EOT as u16, 1, 2, 3]).unwrap();
    let e = err(&dir);
    assert!(e.contains("only the validation shard"), "{e}");
    let train = dir.join("train_000001.bin");
    write_shard(&train, &[EOT as u16, 5, 6, 7, 8]).unwrap();
    assert!(ShardSet::open(&dir).is_ok());
    let good = std::fs::read(&train).unwrap();
    let damage = |f: &dyn Fn(&mut Vec<u8>), want: &str| {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(&train, &b).unwrap();
        let e = err(&dir);
        assert!(e.contains("train_000001.bin") && e.contains(want), "{e}");
    };
    damage(&|b| b.truncate(b.len() - 1), "truncated");
    damage(&|b| b[8] = 2, "version 2");
    damage(
        &|b| b[12..16].copy_from_slice(&50304u32.to_le_bytes()),
        "50304-token vocabulary",
    );
    damage(&|b| b[0] = b'X', "not a token shard");
    // A token outside the vocabulary is found when a batch reads it.
    let mut b = good.clone();
    b[HEADER_BYTES + 4..HEADER_BYTES + 6].copy_from_slice(&60000u16.to_le_bytes());
    std::fs::write(&train, &b).unwrap();
    let corpus = Corpus::open(&dir).unwrap();
    let mut l = DataLoader::train(&corpus, 1, 3, None).unwrap();
    let e = l.next_batch().unwrap_err().to_string();
    assert!(e.contains("train_000001.bin") && e.contains("60000"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Shards of the bundled corpus cut into documents at its blank lines, small enough that
/// batches cross shard boundaries.
fn document_shards(name: &str) -> (PathBuf, Corpus) {
    let dir = temp_dir(name);
    let input = dir.join("docs.jsonl");
    let text = std::fs::read_to_string(corpus_path()).unwrap();
    let lines: Vec<String> = text[..120_000]
        .split("\n\n")
        .map(|d| serde_json::json!({ "text": d }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let mut o = PrepareOptions::new(dir.join("out"));
    o.shard_tokens = 5000;
    prepare(&[input], &o).unwrap();
    let corpus = Corpus::open(&dir.join("out")).unwrap();
    (dir, corpus)
}

#[test]
fn the_shard_loader_gives_the_text_loaders_batches_for_the_same_tokens() {
    let (dir, corpus) = document_shards("same");
    let set = match &corpus {
        Corpus::Shards(s) => s.clone(),
        Corpus::Text(_) => unreachable!(),
    };
    assert!(set.train.len() >= 4, "{} shards", set.train.len());
    let mut stream = Vec::new();
    for s in &set.train {
        s.read_into(0..s.len(), &mut stream).unwrap();
    }
    let (b, t) = (3, 100);
    let mut text = DataLoader::new(Arc::new(stream.clone()), b, t).unwrap();
    let mut shards = DataLoader::train(&corpus, b, t, None).unwrap();
    // Two epochs and more: every shard boundary and the wrap.
    let per_epoch = (stream.len() - 1) / (b * t);
    for i in 0..2 * per_epoch + 3 {
        assert_eq!(
            shards.next_batch().unwrap(),
            text.next_batch().unwrap(),
            "batch {i}"
        );
        assert_eq!(shards.position(), text.position());
    }
    assert_eq!(shards.state().epoch, 2);
    // The validation split is the first shard, read from its start.
    let mut val = DataLoader::validation(&corpus, b, t).unwrap();
    let mut want = Vec::new();
    set.val.read_into(0..b * t + 1, &mut want).unwrap();
    let first = val.next_batch().unwrap();
    assert_eq!(first.x, want[..b * t]);
    val.next_batch().unwrap();
    val.reset();
    assert_eq!(val.next_batch().unwrap(), first);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shuffled_epochs_resume_exactly_across_shard_boundaries() {
    let (dir, corpus) = document_shards("shuffle");
    let (b, t) = (2, 64);
    let seed = 1337;
    let epoch_len = corpus.train_tokens();
    let mut a = DataLoader::train(&corpus, b, t, Some(seed)).unwrap();
    let mut plain = DataLoader::train(&corpus, b, t, None).unwrap();
    let per_epoch = (epoch_len - 1) / (b * t);
    let mut epoch0 = Vec::new();
    let mut differs = false;
    for _ in 0..per_epoch {
        let x = a.next_batch().unwrap();
        differs |= x != plain.next_batch().unwrap();
        epoch0.extend_from_slice(&x.x);
    }
    assert!(differs, "shuffling changed nothing");
    assert_eq!(a.state().epoch, 1);
    // An epoch of shuffled documents holds the same tokens as the stream in order, up to the
    // tail a wrap leaves out.
    let mut in_order = Vec::new();
    let mut p = DataLoader::train(&corpus, b, t, None).unwrap();
    for _ in 0..per_epoch {
        in_order.extend_from_slice(&p.next_batch().unwrap().x);
    }
    let count = |v: &[u32]| v.iter().filter(|&&x| x == EOT).count();
    let tail = epoch_len - per_epoch * b * t;
    assert!(count(&epoch0).abs_diff(count(&in_order)) <= tail);
    // Stop in the middle of a shard of the second epoch (whose order differs from the
    // first), resume from the saved state, and go on past shard boundaries and into epoch 2.
    for _ in 0..per_epoch / 3 {
        a.next_batch().unwrap();
    }
    let saved = a.state();
    assert!(saved.epoch == 1 && saved.position > 0);
    let mut resumed = DataLoader::train(&corpus, b, t, Some(seed)).unwrap();
    resumed.set_state(saved).unwrap();
    for i in 0..per_epoch {
        assert_eq!(
            resumed.next_batch().unwrap(),
            a.next_batch().unwrap(),
            "batch {i} after resume"
        );
    }
    assert_eq!(a.state().epoch, 2);
    // Epochs are shuffled differently.
    let mut e1 = DataLoader::train(&corpus, b, t, Some(seed)).unwrap();
    e1.set_state(LoaderState {
        epoch: 1,
        position: 0,
    })
    .unwrap();
    let mut e0 = DataLoader::train(&corpus, b, t, Some(seed)).unwrap();
    assert_ne!(e1.next_batch().unwrap(), e0.next_batch().unwrap());
    // A state that does not fit the data is refused.
    assert!(resumed
        .set_state(LoaderState {
            epoch: 0,
            position: epoch_len
        })
        .is_err());
    // Text cannot be shuffled.
    let e = DataLoader::train(&Corpus::from(vec![1u32; 100]), 1, 4, Some(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shards"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
