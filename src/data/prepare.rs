//! Text to token shards (`prepare-data`): text files, folders of them, or JSON lines with a text
//! field, tokenised on all cores, each document preceded by `<|endoftext|>`, cut into shards of
//! a fixed token count. The first shard is the validation split.
//!
//! The output does not depend on the number of cores: the text is cut into pieces only where
//! GPT-2's pre-tokeniser cuts anyway (after a lone newline between printable ASCII
//! characters, see [`last_cut`]), the pieces are encoded in parallel and their tokens joined in
//! input order. So a text file gives exactly the tokens of encoding it whole.
//!
//! Shards are written into a temporary folder inside the output folder and moved into place
//! when every input has been read: an input that fails (not UTF-8, a malformed JSON line)
//! leaves the output folder as it was.

use super::shard::{shard_name, write_shard};
use super::{Tokenizer, EOT};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Default tokens per shard (the reference's FineWeb shards hold 100M).
pub const DEFAULT_SHARD_TOKENS: usize = 100_000_000;

/// Text is read in blocks of about this many bytes...
const BLOCK_BYTES: usize = 4 << 20;
/// ...cut into pieces of about this many bytes for the workers...
const PIECE_BYTES: usize = 256 << 10;
/// ...and handed to them this many bytes at a time.
const BATCH_BYTES: usize = 32 << 20;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub out: PathBuf,
    pub shard_tokens: usize,
    /// The field of a JSON-lines record that holds the document.
    pub text_field: String,
    /// Show a progress bar on the terminal.
    pub progress: bool,
}

impl PrepareOptions {
    pub fn new(out: impl Into<PathBuf>) -> PrepareOptions {
        PrepareOptions {
            out: out.into(),
            shard_tokens: DEFAULT_SHARD_TOKENS,
            text_field: "text".into(),
            progress: false,
        }
    }
}

/// What a preparation wrote.
#[derive(Clone, Debug, Default)]
pub struct PrepareReport {
    /// The shard files, validation first.
    pub shards: Vec<PathBuf>,
    pub tokens: u64,
    pub val_tokens: u64,
    pub documents: u64,
    pub bytes: u64,
    pub seconds: f64,
}

impl PrepareReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// How an input file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The whole file is one document.
    Text,
    /// One JSON object per line, the document in its text field.
    JsonLines,
}

fn kind_of(path: &Path) -> Kind {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") | Some("ndjson") => Kind::JsonLines,
        _ => Kind::Text,
    }
}

/// The input files, in a fixed order: each argument in turn, a folder's files sorted by path
/// (hidden files and the output folder left out).
pub fn input_files(inputs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
            .collect::<Result<_>>()?;
        entries.sort();
        for p in entries {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || same_path(&p, out) {
                continue;
            }
            if p.is_dir() {
                walk(&p, out, files)?;
            } else {
                files.push(p);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        return Err(Error::Config(
            "no input given: name text files, folders of them, or JSON-lines files".into(),
        ));
    }
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| {
            Error::io(
                input,
                std::io::Error::new(e.kind(), format!("{e}; name an existing file or folder")),
            )
        })?;
        if meta.is_dir() {
            walk(input, out, &mut files)?;
        } else {
            files.push(input.clone());
        }
    }
    if files.is_empty() {
        return Err(Error::Config(format!(
            "the inputs hold no files ({}): nothing to prepare",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(files)
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A piece of text to encode; `starts_document` puts `<|endoftext|>` before it.
struct Piece {
    text: String,
    starts_document: bool,
}

/// Collects shards in a temporary folder.
struct ShardWriter {
    tmp: PathBuf,
    shard_tokens: usize,
    buf: Vec<u16>,
    names: Vec<String>,
    tokens: u64,
    val_tokens: u64,
}

impl ShardWriter {
    fn push(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            let room = self.shard_tokens - self.buf.len();
            let take = room.min(tokens.len());
            // GPT-2 ids are below 50257: they fit u16.
            self.buf.extend(tokens[..take].iter().map(|&t| t as u16));
            tokens = &tokens[take..];
            if self.buf.len() == self.shard_tokens {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let name = shard_name(self.names.len());
        write_shard(&self.tmp.join(&name), &self.buf)?;
        if self.names.is_empty() {
            self.val_tokens = self.buf.len() as u64;
        }
        self.tokens += self.buf.len() as u64;
        self.names.push(name);
        self.buf.clear();
        Ok(())
    }
}

/// Where a block of text may be cut without changing its tokens: just after a lone newline
/// between printable ASCII characters. No pre-token spans it, and the newline is a pre-token
/// of its own whether the text ends there or goes on (a longer run of whitespace would not be:
/// at the end of a text GPT-2's `\s+(?!\S)` takes the whole run). Returns the last such cut
/// at or before `limit`.
fn last_cut(bytes: &[u8], limit: usize) -> Option<usize> {
    let limit = limit.min(bytes.len().saturating_sub(1));
    (2..=limit).rev().find(|&i| {
        bytes[i - 1] == b'\n' && bytes[i].is_ascii_graphic() && bytes[i - 2].is_ascii_graphic()
    })
}

/// Cuts `text` into pieces of about [`PIECE_BYTES`] at safe cuts.
fn cut_pieces(text: String, starts_document: bool, out: &mut Vec<Piece>) {
    let bytes = text.as_bytes();
    let mut from = 0;
    let mut first = starts_document;
    while bytes.len() - from > PIECE_BYTES {
        match last_cut(&bytes[from..], PIECE_BYTES) {
            Some(c) if c > 0 => {
                out.push(Piece {
                    text: text[from..from + c].to_string(),
                    starts_document: first,
                });
                first = false;
                from += c;
            }
            _ => break,
        }
    }
    out.push(Piece {
        text: text[from..].to_string(),
        starts_document: first,
    });
}

/// Tokenises a batch of pieces on all cores and appends their tokens in order.
fn encode_batch(pieces: &mut Vec<Piece>, writer: &mut ShardWriter) -> Result<u64> {
    let bpe = Tokenizer::gpt2();
    let encoded: Vec<Vec<u32>> = pieces.par_iter().map(|p| bpe.encode(&p.text)).collect();
    let mut documents = 0;
    for (p, tokens) in pieces.iter().zip(&encoded) {
        if p.starts_document {
            writer.push(&[EOT])?;
            documents += 1;
        }
        writer.push(tokens)?;
    }
    pieces.clear();
    Ok(documents)
}

fn utf8(path: &Path, bytes: Vec<u8>, offset: u64) -> Result<String> {
    let s = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {}); give text files or JSON lines",
                offset + e.utf8_error().valid_up_to() as u64
            ),
        )
    })?;
    if s.contains('\0') {
        return Err(Error::format(
            path,
            "contains NUL bytes: this looks like binary data, not text",
        ));
    }
    Ok(s)
}

/// Reads a text file block by block, cutting blocks only at safe cuts.
fn read_text(
    path: &Path,
    pieces: &mut Vec<Piece>,
    mut flush: impl FnMut(&mut Vec<Piece>, u64) -> Result<()>,
) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut carry: Vec<u8> = Vec::new();
    let mut offset = 0u64;
    let mut first = true;
    let mut block = vec![0u8; BLOCK_BYTES];
    loop {
        let n = f.read(&mut block).map_err(|e| Error::io(path, e))?;
        carry.extend_from_slice(&block[..n]);
        let eof = n == 0;
        // Keep what follows the last safe cut for the next block (all of it at the end).
        let cut = if eof {
            carry.len()
        } else {
            match last_cut(&carry, carry.len()) {
                Some(c) if carry.len() >= BLOCK_BYTES => c,
                _ => continue,
            }
        };
        let rest = carry.split_off(cut);
        let consumed = carry.len() as u64;
        let chunk = std::mem::replace(&mut carry, rest);
        if !chunk.is_empty() {
            let text = utf8(path, chunk, offset)?;
            cut_pieces(text, first, pieces);
            first = false;
        }
        offset += consumed;
        flush(pieces, consumed)?;
        if eof {
            return Ok(());
        }
    }
}

/// Reads JSON lines: one document per non-empty line, from its text field.
fn read_json_lines(
    path: &Path,
    field: &str,
    pieces: &mut Vec<Piece>,
    mut flush: impl FnMut(&mut Vec<Piece>, u64) -> Result<()>,
) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut line = Vec::new();
    let mut offset = 0u64;
    let mut number = 0usize;
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let text = utf8(path, std::mem::take(&mut line), offset)?;
        offset += n as u64;
        if text.trim().is_empty() {
            flush(pieces, n as u64)?;
            continue;
        }
        let bad = |what: String| Error::format(path, format!("line {number}: {what}"));
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not JSON ({e}); give one JSON object per line")))?;
        let doc = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
            bad(format!(
                "no string field \"{field}\" (pass --text-field to name the field that holds the text)"
            ))
        })?;
        cut_pieces(doc.to_string(), true, pieces);
        flush(pieces, n as u64)?;
    }
}

/// Tokenises `inputs` into shards in `opts.out` (see the module's documentation).
pub fn prepare(inputs: &[PathBuf], opts: &PrepareOptions) -> Result<PrepareReport> {
    if opts.shard_tokens < 2 {
        return Err(Error::Config("--shard-tokens must be at least 2".into()));
    }
    let files = input_files(inputs, &opts.out)?;
    let total_bytes: u64 = files
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let tmp = opts.out.join(format!(".partial-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = write_all(&files, total_bytes, opts, &tmp);
    match result {
        Ok(mut report) => {
            let moved = finish(&tmp, &opts.out, &mut report);
            let _ = std::fs::remove_dir_all(&tmp);
            moved.map(|()| report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_all(
    files: &[PathBuf],
    total_bytes: u64,
    opts: &PrepareOptions,
    tmp: &Path,
) -> Result<PrepareReport> {
    let start = Instant::now();
    let bar = if opts.progress {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut writer = ShardWriter {
        tmp: tmp.to_path_buf(),
        shard_tokens: opts.shard_tokens,
        buf: Vec::with_capacity(opts.shard_tokens.min(1 << 26)),
        names: Vec::new(),
        tokens: 0,
        val_tokens: 0,
    };
    let mut documents = 0u64;
    let mut pieces = Vec::new();
    let mut pending = 0u64;
    for path in files {
        let mut flush = |pieces: &mut Vec<Piece>, consumed: u64| -> Result<()> {
            pending += consumed;
            let queued: usize = pieces.iter().map(|p| p.text.len()).sum();
            if queued >= BATCH_BYTES {
                documents += encode_batch(pieces, &mut writer)?;
                bar.inc(pending);
                pending = 0;
                bar.set_message(format!(
                    "{} tokens",
                    writer.tokens + writer.buf.len() as u64
                ));
            }
            Ok(())
        };
        match kind_of(path) {
            Kind::Text => read_text(path, &mut pieces, &mut flush)?,
            Kind::JsonLines => read_json_lines(path, &opts.text_field, &mut pieces, &mut flush)?,
        }
    }
    documents += encode_batch(&mut pieces, &mut writer)?;
    writer.flush()?;
    bar.finish_and_clear();
    if writer.tokens == 0 {
        return Err(Error::Config(
            "the inputs hold no text: nothing to prepare".into(),
        ));
    }
    Ok(PrepareReport {
        shards: writer.names.iter().map(|n| opts.out.join(n)).collect(),
        tokens: writer.tokens,
        val_tokens: writer.val_tokens,
        documents,
        bytes: total_bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Moves the new shards into place and removes shards of an earlier preparation that this one
/// did not write (a re-run with fewer shards).
fn finish(tmp: &Path, out: &Path, report: &mut PrepareReport) -> Result<()> {
    let written: Vec<String> = report
        .shards
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for name in &written {
        let to = out.join(name);
        std::fs::rename(tmp.join(name), &to).map_err(|e| Error::io(&to, e))?;
    }
    for e in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let e = e.map_err(|e| Error::io(out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let shard =
            (name.starts_with("val_") || name.starts_with("train_")) && name.ends_with(".bin");
        if shard && !written.contains(&name) {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_fall_after_a_newline_before_printable_ascii() {
        let b = b"ab\ncd\n\nef\nGh";
        assert_eq!(last_cut(b, b.len()), Some(10));
        assert_eq!(last_cut(b, 9), Some(3));
        assert_eq!(last_cut(b"no newline", 10), None);
        // A newline next to whitespace is no cut: "\n\n" or " \n" at the end of a piece
        // would be one pre-token, in the whole text two.
        assert_eq!(last_cut(b"a\n b", 4), None);
        assert_eq!(last_cut(b"a \nb", 4), None);
        assert_eq!(last_cut(b"a\n\nb", 4), None);
    }

    #[test]
    fn pieces_encode_to_the_whole_texts_tokens() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
        let text = std::fs::read_to_string(path).unwrap();
        let text = text[..300_000].to_string();
        let mut pieces = Vec::new();
        cut_pieces(text.clone(), true, &mut pieces);
        assert!(pieces.len() > 1, "the text should be cut");
        let bpe = Tokenizer::gpt2();
        let joined: Vec<u32> = pieces.iter().flat_map(|p| bpe.encode(&p.text)).collect();
        assert_eq!(joined, bpe.encode(&text));
    }
}
