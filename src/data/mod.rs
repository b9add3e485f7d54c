//! Text data: GPT-2 BPE tokenisation (tiktoken-rs, r50k_base) and the sequential batch loader.

use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

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

/// One batch: `x` are the inputs and `y` the targets (x shifted by one), each B*T tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub x: Vec<u32>,
    pub y: Vec<u32>,
}

/// The sequential loader of the reference recipe: batch = tokens[pos .. pos + B*T + 1], then
/// pos += B*T, and back to 0 when the next batch would run past the end.
#[derive(Clone, Debug)]
pub struct DataLoader {
    tokens: Arc<Vec<u32>>,
    b: usize,
    t: usize,
    pos: usize,
}

impl DataLoader {
    pub fn new(tokens: Arc<Vec<u32>>, b: usize, t: usize) -> Result<DataLoader> {
        if b == 0 || t == 0 {
            return Err(Error::Config(format!(
                "batch size and sequence length must be at least 1 (got B={b}, T={t})"
            )));
        }
        let need = b * t + 1;
        if tokens.len() < need {
            return Err(Error::Config(format!(
                "the data has {} tokens but one batch needs B*T+1 = {need}; use a longer text or a smaller -B / -T",
                tokens.len()
            )));
        }
        Ok(DataLoader {
            tokens,
            b,
            t,
            pos: 0,
        })
    }

    pub fn next_batch(&mut self) -> Batch {
        let n = self.b * self.t;
        let buf = &self.tokens[self.pos..self.pos + n + 1];
        let batch = Batch {
            x: buf[..n].to_vec(),
            y: buf[1..].to_vec(),
        };
        self.pos += n;
        if self.pos + n + 1 > self.tokens.len() {
            self.pos = 0;
        }
        batch
    }

    /// The position of the next batch (saved in checkpoints).
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn set_position(&mut self, pos: usize) -> Result<()> {
        if pos + self.b * self.t + 1 > self.tokens.len() {
            return Err(Error::Config(format!(
                "loader position {pos} does not fit the data ({} tokens) with B={} T={}",
                self.tokens.len(),
                self.b,
                self.t
            )));
        }
        self.pos = pos;
        Ok(())
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_walks_and_wraps_like_the_recipe() {
        let tokens: Arc<Vec<u32>> = Arc::new((0..23).collect());
        let mut l = DataLoader::new(tokens, 2, 5).unwrap();
        let b = l.next_batch();
        assert_eq!(b.x, (0..10).collect::<Vec<_>>());
        assert_eq!(b.y, (1..11).collect::<Vec<_>>());
        let b = l.next_batch();
        assert_eq!(b.x[0], 10);
        assert_eq!(*b.y.last().unwrap(), 20);
        // 20 + 11 > 23: wraps
        assert_eq!(l.position(), 0);
    }

    #[test]
    fn tokenizer_round_trips() {
        let t = Tokenizer::gpt2();
        let ids = t.encode("Hello, I'm a language model,");
        assert_eq!(ids[0], 15496); // "Hello"
        assert_eq!(t.decode(&ids), "Hello, I'm a language model,");
    }
}
