//! Token shards: GPT-2 token ids as u16 after a small header, read memory-mapped.
//!
//! A shard file is
//!
//! | bytes  | field                                             |
//! |--------|---------------------------------------------------|
//! | 0..8   | magic `WGPTTOKS`                                  |
//! | 8..12  | format version (u32, little-endian), now 1        |
//! | 12..16 | vocabulary size of the token ids (u32), 50257     |
//! | 16..24 | token count (u64)                                 |
//! | 24..32 | reserved, 0                                       |
//! | 32..   | the tokens, u16 little-endian                     |
//!
//! A prepared folder holds `val_000000.bin` (the validation split) and `train_000001.bin`,
//! `train_000002.bin`, ... (the training stream, in order). Every document starts with
//! `<|endoftext|>`, so a shard's documents are found from its tokens alone.

use super::EOT;
use crate::error::{Error, Result};
use crate::model::config::GPT2_VOCAB;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"WGPTTOKS";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;

/// The header of a shard holding `tokens` GPT-2 tokens.
pub fn header(tokens: u64) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(GPT2_VOCAB as u32).to_le_bytes());
    h[16..24].copy_from_slice(&tokens.to_le_bytes());
    h
}

/// File name of shard `index`: the first is the validation split.
pub fn shard_name(index: usize) -> String {
    if index == 0 {
        format!("val_{index:06}.bin")
    } else {
        format!("train_{index:06}.bin")
    }
}

/// Writes a shard whole: to a temporary file in the same folder, then renamed over `path`, so a
/// shard on disk is always complete.
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("bin.partial");
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&header(tokens.len() as u64))?;
        if cfg!(target_endian = "little") {
            f.write_all(bytemuck::cast_slice(tokens))?;
        } else {
            for t in tokens {
                f.write_all(&t.to_le_bytes())?;
            }
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One shard, memory-mapped and checked.
pub struct Shard {
    pub path: PathBuf,
    map: memmap2::Mmap,
    len: usize,
}

impl Shard {
    /// Opens and checks a shard: magic, version, vocabulary, and a length that matches the
    /// token count (a truncated file is refused). Token values are checked as batches read them.
    pub fn open(path: &Path) -> Result<Shard> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; a shard changed by another process while training
        // reads it gives wrong tokens (caught by the range check) but no unsoundness in Rust's
        // sense beyond what reading a file gives.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |what: String| Error::format(path, what);
        if map.len() < HEADER_BYTES || &map[..8] != MAGIC {
            return Err(bad(
                "not a token shard (no WGPTTOKS header); make shards with prepare-data".into(),
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(map[i..i + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "shard format version {version}, this build reads version {VERSION}; prepare the data again with this build's prepare-data"
            )));
        }
        let vocab = u32_at(12);
        if vocab as usize != GPT2_VOCAB {
            return Err(bad(format!(
                "the shard holds tokens of a {vocab}-token vocabulary, the trainer's GPT-2 tokenizer has {GPT2_VOCAB}; prepare the data again with prepare-data"
            )));
        }
        let count = u64::from_le_bytes(map[16..24].try_into().unwrap());
        let expected = count
            .checked_mul(2)
            .and_then(|b| b.checked_add(HEADER_BYTES as u64));
        if expected != Some(map.len() as u64) {
            return Err(bad(format!(
                "the header says {count} tokens ({} bytes) but the file has {} bytes: it is truncated or damaged; prepare it again",
                expected.map_or("too many".to_string(), |e| e.to_string()),
                map.len()
            )));
        }
        if count == 0 {
            return Err(bad("the shard holds no tokens".into()));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            len: count as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends tokens `range` to `out` as u32, refusing ids outside the GPT-2 vocabulary.
    pub fn read_into(&self, range: std::ops::Range<usize>, out: &mut Vec<u32>) -> Result<()> {
        let bytes = &self.map[HEADER_BYTES + 2 * range.start..HEADER_BYTES + 2 * range.end];
        let start = out.len();
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32),
        );
        if let Some(i) = out[start..].iter().position(|&t| t as usize >= GPT2_VOCAB) {
            return Err(Error::format(
                &self.path,
                format!(
                    "token {} at position {} is outside the GPT-2 vocabulary ({GPT2_VOCAB}): the shard is damaged; prepare it again",
                    out[start + i],
                    range.start + i
                ),
            ));
        }
        Ok(())
    }

    /// Where each document starts: every `<|endoftext|>`, and 0 when the shard begins inside
    /// a document (one continued from the previous shard).
    pub fn document_starts(&self) -> Vec<usize> {
        let tokens = &self.map[HEADER_BYTES..];
        let mut starts = Vec::new();
        let eot = (EOT as u16).to_le_bytes();
        for (i, b) in tokens.chunks_exact(2).enumerate() {
            if b == eot || i == 0 {
                starts.push(i);
            }
        }
        starts
    }
}

/// A prepared folder: the validation shard and the training shards in order.
pub struct ShardSet {
    pub dir: PathBuf,
    pub val: Shard,
    pub train: Vec<Shard>,
}

impl ShardSet {
    /// Opens every shard of `dir` (see the module's documentation for the names).
    pub fn open(dir: &Path) -> Result<ShardSet> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut val = Vec::new();
        let mut train = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let index = |prefix: &str| -> Option<usize> {
                name.strip_prefix(prefix)?
                    .strip_suffix(".bin")?
                    .parse()
                    .ok()
            };
            if let Some(i) = index("val_") {
                val.push((i, e.path()));
            } else if let Some(i) = index("train_") {
                train.push((i, e.path()));
            }
        }
        if val.is_empty() && train.is_empty() {
            return Err(Error::format(
                dir,
                "no token shards in this folder (val_*.bin, train_*.bin); make them with `prepare-data INPUT --out DIR`",
            ));
        }
        if val.len() != 1 {
            return Err(Error::format(
                dir,
                format!(
                    "expected one validation shard (val_000000.bin), found {}; prepare the folder again",
                    val.len()
                ),
            ));
        }
        if train.is_empty() {
            return Err(Error::format(
                dir,
                "only the validation shard, no training shards: the input fitted in one shard; run prepare-data again with a smaller --shard-tokens",
            ));
        }
        train.sort();
        let val = Shard::open(&val[0].1)?;
        let train = train
            .iter()
            .map(|(_, p)| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(ShardSet {
            dir: dir.to_path_buf(),
            val,
            train,
        })
    }

    /// Tokens in the training shards.
    pub fn train_tokens(&self) -> usize {
        self.train.iter().map(|s| s.len()).sum()
    }

    /// Shards in the folder, the validation shard included.
    pub fn shard_count(&self) -> usize {
        self.train.len() + 1
    }
}
