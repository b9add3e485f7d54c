//! Data: GPT-2 BPE tokenisation (tiktoken-rs, r50k_base), token shards, their preparation
//! from text, and the batch loader.

pub mod loader;
pub mod prepare;
pub mod shard;

pub use loader::{Batch, Corpus, DataLoader, LoaderState};

use crate::error::{Error, Result};
use std::path::Path;

/// The id of `<|endoftext|>`.
pub const EOT: u32 = 50256;

/// GPT-2's byte-pair encoding.
pub struct Tokenizer {
    bpe: &'static tiktoken_rs::CoreBPE,
}

impl Tokenizer {
    pub fn gpt2() -> Tokenizer {
        Tokenizer {
            bpe: tiktoken_rs::r50k_base_singleton(),
        }
    }

    /// Encodes text as ordinary tokens (special-token text is not treated specially).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    /// Decodes tokens to text; bytes that are not (yet) valid UTF-8 show as U+FFFD.
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self.bpe.decode_bytes(tokens) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => tokens
                .iter()
                .map(|&t| {
                    self.bpe
                        .decode_bytes(&[t])
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_else(|_| "\u{FFFD}".into())
                })
                .collect(),
        }
    }

    /// The raw bytes of tokens (for streaming output that may split a UTF-8 character).
    pub fn decode_bytes(&self, tokens: &[u32]) -> Vec<u8> {
        self.bpe.decode_bytes(tokens).unwrap_or_default()
    }
}

/// Reads a UTF-8 text file and tokenises it, with errors that say what to do.
pub fn load_tokens(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                e.kind(),
                "no such file; pass an existing UTF-8 text file with --data",
            )
        } else {
            e
        };
        Error::io(path, hint)
    })?;
    if bytes.is_empty() {
        return Err(Error::format(
            path,
            "the data file is empty; give a UTF-8 text file with some text in it",
        ));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::format(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {}); the trainer reads plain text files",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    if text.contains('\0') {
        return Err(Error::format(
            path,
            "contains NUL bytes: this looks like binary data, not text",
        ));
    }
    Ok(Tokenizer::gpt2().encode(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips() {
        let t = Tokenizer::gpt2();
        let ids = t.encode("Hello, I'm a language model,");
        assert_eq!(ids[0], 15496); // "Hello"
        assert_eq!(t.decode(&ids), "Hello, I'm a language model,");
    }
}
