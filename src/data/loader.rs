//! The batch loader: the reference recipe's sequential walk over one token stream, where the
//! stream is a text file's tokens or a folder of shards read memory-mapped across their
//! boundaries, optionally shuffled (shard order, and document order within each shard) anew
//! every epoch from the run's seed.
//!
//! A batch is `stream[pos .. pos + B*T + 1]` (inputs, and targets shifted by one), then
//! `pos += B*T`; when the next batch would run past the end of the stream, the next epoch
//! starts at 0. The state, `(epoch, pos)`, is all a checkpoint needs: the shuffled orders are
//! recomputed from the seed and the epoch.

use super::shard::{Shard, ShardSet};
use crate::error::{Error, Result, Setting};
use crate::rng::Rng;
use std::path::Path;
use std::sync::Arc;

/// What a run trains on.
#[derive(Clone)]
pub enum Corpus {
    /// A text file's tokens, held in memory.
    Text(Arc<Vec<u32>>),
    /// A folder of prepared shards.
    Shards(Arc<ShardSet>),
}

impl From<Arc<Vec<u32>>> for Corpus {
    fn from(tokens: Arc<Vec<u32>>) -> Corpus {
        Corpus::Text(tokens)
    }
}

impl From<Vec<u32>> for Corpus {
    fn from(tokens: Vec<u32>) -> Corpus {
        Corpus::Text(Arc::new(tokens))
    }
}

impl Corpus {
    /// A folder of shards, or a UTF-8 text file (tokenised now).
    pub fn open(path: &Path) -> Result<Corpus> {
        if path.is_dir() {
            Ok(Corpus::Shards(Arc::new(ShardSet::open(path)?)))
        } else {
            Ok(Corpus::Text(Arc::new(super::load_tokens(path)?)))
        }
    }

    /// Where the tokens come from, for the log line after `loaded N tokens`: the shard
    /// folder's layout (None for a text).
    pub fn describe_shards(&self) -> Option<String> {
        match self {
            Corpus::Text(_) => None,
            Corpus::Shards(s) => Some(format!(
                "data: {} training shards in {}, validation shard of {} tokens",
                s.train.len(),
                s.dir.display(),
                s.val.len()
            )),
        }
    }

    /// Tokens of the training stream.
    pub fn train_tokens(&self) -> usize {
        match self {
            Corpus::Text(t) => t.len(),
            Corpus::Shards(s) => s.train_tokens(),
        }
    }
}

/// Where the loader stands: the epoch (how many times the stream has wrapped) and the position
/// of the next batch in that epoch's stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: usize,
}

/// One batch: `x` are the inputs and `y` the targets (x shifted by one), each B*T tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub x: Vec<u32>,
    pub y: Vec<u32>,
}

/// Which stream a loader walks.
#[derive(Clone)]
enum Stream {
    Text(Arc<Vec<u32>>),
    /// The training shards; `shuffle` holds the run's seed when shuffling.
    Train {
        set: Arc<ShardSet>,
        shuffle: Option<u64>,
    },
    /// The validation shard, in order.
    Val(Arc<ShardSet>),
}

/// A shard's documents in one epoch's order: (start, length) pieces and their running total.
struct DocOrder {
    shard: usize,
    pieces: Vec<(usize, usize)>,
    ends: Vec<usize>,
}

/// The training shards in one epoch's order, with running token totals.
struct EpochOrder {
    epoch: u64,
    shards: Vec<usize>,
    /// `ends[k]`: tokens of the first k+1 shards in this order.
    ends: Vec<usize>,
    /// Document orders of the shards read lately (at most two: a batch spans a boundary).
    docs: Vec<Arc<DocOrder>>,
}

/// The sequential loader (see the module's documentation).
pub struct DataLoader {
    stream: Stream,
    b: usize,
    t: usize,
    state: LoaderState,
    order: Option<EpochOrder>,
}

/// Fisher-Yates from a seed: the same permutation on every machine and in every version.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Seeds of the shuffles: one per epoch for the shard order, one per (epoch, shard) for the
/// documents, all derived from the run's seed.
fn shuffle_seed(seed: u64, epoch: u64, shard: Option<usize>) -> u64 {
    let mut x = seed ^ 0x5EED_DA7A_0000_0000;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    match shard {
        Some(s) => x ^ (s as u64 + 1).wrapping_mul(0x94D0_49BB_1331_11EB),
        None => x,
    }
}

impl DataLoader {
    /// The sequential loader over a text's tokens.
    pub fn new(tokens: Arc<Vec<u32>>, b: usize, t: usize) -> Result<DataLoader> {
        Self::with_stream(Stream::Text(tokens), b, t)
    }

    /// The training stream of `corpus`; `shuffle` (the run's seed) shuffles shards and
    /// documents per epoch, which only a shard folder can do.
    pub fn train(corpus: &Corpus, b: usize, t: usize, shuffle: Option<u64>) -> Result<DataLoader> {
        match corpus {
            Corpus::Text(tokens) => {
                if shuffle.is_some() {
                    return Err(Error::setting(
                        Setting::Shuffle,
                        "shuffling needs a folder of shards (documents to shuffle); make one with prepare-data, or train on the text in order",
                    ));
                }
                Self::new(tokens.clone(), b, t)
            }
            Corpus::Shards(set) => Self::with_stream(
                Stream::Train {
                    set: set.clone(),
                    shuffle,
                },
                b,
                t,
            ),
        }
    }

    /// The validation split of a shard folder, in order from its start.
    pub fn validation(corpus: &Corpus, b: usize, t: usize) -> Result<DataLoader> {
        match corpus {
            Corpus::Shards(set) => Self::with_stream(Stream::Val(set.clone()), b, t),
            Corpus::Text(_) => Err(Error::setting(
                Setting::ValEvery,
                "validation needs a folder of shards (its first shard is the validation split); make one with prepare-data",
            )),
        }
    }

    fn with_stream(stream: Stream, b: usize, t: usize) -> Result<DataLoader> {
        if b == 0 || t == 0 {
            return Err(Error::Config(format!(
                "batch size and sequence length must be at least 1 (got B={b}, T={t})"
            )));
        }
        let l = DataLoader {
            stream,
            b,
            t,
            state: LoaderState::default(),
            order: None,
        };
        let need = b * t + 1;
        let have = l.stream_len();
        if have < need {
            let what = match &l.stream {
                Stream::Text(_) => "the data has".to_string(),
                Stream::Train { set, .. } => {
                    format!("the training shards of {} have", set.dir.display())
                }
                Stream::Val(set) => format!("the validation shard {} has", set.val.path.display()),
            };
            return Err(Error::Config(format!(
                "{what} {have} tokens but one batch needs B*T+1 = {need}; use more data or a smaller -B / -T"
            )));
        }
        Ok(l)
    }

    /// Tokens of one epoch's stream.
    fn stream_len(&self) -> usize {
        match &self.stream {
            Stream::Text(t) => t.len(),
            Stream::Train { set, .. } => set.train_tokens(),
            Stream::Val(set) => set.val.len(),
        }
    }

    /// The next batch; errors only for a damaged shard.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let n = self.b * self.t;
        let mut buf = Vec::with_capacity(n + 1);
        self.read(self.state.position, n + 1, &mut buf)?;
        self.advance();
        Ok(Batch {
            x: buf[..n].to_vec(),
            y: buf[1..].to_vec(),
        })
    }

    /// Data parallel: the next `ranks` batches of the stream, of which `rank` reads its own,
    /// the `rank`-th, and steps over the others (which the other ranks read). Every rank's
    /// loader stays at the same position, which is that of one loader taking all `ranks`
    /// batches; with one rank this is [`DataLoader::next_batch`].
    pub fn next_batch_of(&mut self, rank: usize, ranks: usize) -> Result<Batch> {
        if rank >= ranks {
            return Err(Error::Other(format!(
                "rank {rank} is outside a job of {ranks} ranks"
            )));
        }
        for _ in 0..rank {
            self.advance();
        }
        let batch = self.next_batch()?;
        for _ in rank + 1..ranks {
            self.advance();
        }
        Ok(batch)
    }

    /// Moves past one batch without reading it.
    fn advance(&mut self) {
        let n = self.b * self.t;
        self.state.position += n;
        if self.state.position + n + 1 > self.stream_len() {
            self.state.position = 0;
            self.state.epoch += 1;
        }
    }

    /// Where the next batch starts (saved in checkpoints).
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Moves to a saved state (a resumed run).
    pub fn set_state(&mut self, state: LoaderState) -> Result<()> {
        if state.position + self.b * self.t + 1 > self.stream_len() {
            return Err(Error::Config(format!(
                "loader position {} does not fit the data ({} tokens) with B={} T={}: resume on the data the run was started with",
                state.position,
                self.stream_len(),
                self.b,
                self.t
            )));
        }
        self.state = state;
        Ok(())
    }

    /// Back to the start of the stream (validation reads the same batches every time).
    pub fn reset(&mut self) {
        self.state = LoaderState::default();
    }

    /// The position of the next batch in the current epoch.
    pub fn position(&self) -> usize {
        self.state.position
    }

    /// Tokens of one epoch's stream.
    pub fn num_tokens(&self) -> usize {
        self.stream_len()
    }

    /// Appends `len` tokens of the current epoch's stream from `pos`.
    fn read(&mut self, pos: usize, len: usize, out: &mut Vec<u32>) -> Result<()> {
        let (set, shuffle) = match &self.stream {
            Stream::Text(t) => {
                out.extend_from_slice(&t[pos..pos + len]);
                return Ok(());
            }
            Stream::Val(set) => return set.val.read_into(pos..pos + len, out),
            Stream::Train { set, shuffle } => (set.clone(), *shuffle),
        };
        let epoch = self.state.epoch;
        if self.order.as_ref().map(|o| o.epoch) != Some(epoch) {
            let shards = match shuffle {
                Some(seed) => permutation(set.train.len(), shuffle_seed(seed, epoch, None)),
                None => (0..set.train.len()).collect(),
            };
            let mut total = 0;
            let ends = shards
                .iter()
                .map(|&s| {
                    total += set.train[s].len();
                    total
                })
                .collect();
            self.order = Some(EpochOrder {
                epoch,
                shards,
                ends,
                docs: Vec::new(),
            });
        }
        let (mut p, end) = (pos, pos + len);
        while p < end {
            let order = self.order.as_mut().expect("set above");
            let k = order.ends.partition_point(|&e| e <= p);
            let start = if k == 0 { 0 } else { order.ends[k - 1] };
            let take = end.min(order.ends[k]) - p;
            let shard_index = order.shards[k];
            let shard = &set.train[shard_index];
            match shuffle {
                None => shard.read_into(p - start..p - start + take, out)?,
                Some(seed) => {
                    let docs = doc_order(order, shard, shard_index, seed);
                    read_documents(shard, &docs, p - start, take, out)?;
                }
            }
            p += take;
        }
        Ok(())
    }
}

/// The document order of `shard` in this epoch, computed once and kept for the next batch.
fn doc_order(order: &mut EpochOrder, shard: &Shard, index: usize, seed: u64) -> Arc<DocOrder> {
    if let Some(d) = order.docs.iter().find(|d| d.shard == index) {
        return d.clone();
    }
    let starts = shard.document_starts();
    let perm = permutation(starts.len(), shuffle_seed(seed, order.epoch, Some(index)));
    let mut pieces = Vec::with_capacity(perm.len());
    let mut ends = Vec::with_capacity(perm.len());
    let mut total = 0;
    for i in perm {
        let end = starts.get(i + 1).copied().unwrap_or(shard.len());
        pieces.push((starts[i], end - starts[i]));
        total += end - starts[i];
        ends.push(total);
    }
    let d = Arc::new(DocOrder {
        shard: index,
        pieces,
        ends,
    });
    if order.docs.len() >= 2 {
        order.docs.remove(0);
    }
    order.docs.push(d.clone());
    d
}

/// Appends `len` tokens from `pos` of a shard's documents in shuffled order.
fn read_documents(
    shard: &Shard,
    docs: &DocOrder,
    pos: usize,
    len: usize,
    out: &mut Vec<u32>,
) -> Result<()> {
    let (mut p, end) = (pos, pos + len);
    while p < end {
        let i = docs.ends.partition_point(|&e| e <= p);
        let doc_start = docs.ends[i] - docs.pieces[i].1;
        let take = end.min(docs.ends[i]) - p;
        let from = docs.pieces[i].0 + (p - doc_start);
        shard.read_into(from..from + take, out)?;
        p += take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_walks_and_wraps_like_the_recipe() {
        let tokens: Arc<Vec<u32>> = Arc::new((0..23).collect());
        let mut l = DataLoader::new(tokens, 2, 5).unwrap();
        let b = l.next_batch().unwrap();
        assert_eq!(b.x, (0..10).collect::<Vec<_>>());
        assert_eq!(b.y, (1..11).collect::<Vec<_>>());
        let b = l.next_batch().unwrap();
        assert_eq!(b.x[0], 10);
        assert_eq!(*b.y.last().unwrap(), 20);
        // 20 + 11 > 23: wraps into the next epoch
        assert_eq!(
            l.state(),
            LoaderState {
                epoch: 1,
                position: 0
            }
        );
    }

    #[test]
    fn ranks_read_their_slices_of_one_loaders_walk() {
        // Two ranks taking turns read what one loader reads, wraps included, and stay at its
        // position.
        let tokens: Arc<Vec<u32>> = Arc::new((0..53).collect());
        let mut one = DataLoader::new(tokens.clone(), 2, 5).unwrap();
        let mut ranks: Vec<_> = (0..2)
            .map(|_| DataLoader::new(tokens.clone(), 2, 5).unwrap())
            .collect();
        for _ in 0..7 {
            for (r, l) in ranks.iter_mut().enumerate() {
                assert_eq!(l.next_batch_of(r, 2).unwrap(), one.next_batch().unwrap());
            }
            assert_eq!(ranks[0].state(), one.state());
            assert_eq!(ranks[1].state(), one.state());
        }
        assert!(one.state().epoch > 0);
        assert!(ranks[0].next_batch_of(2, 2).is_err());
    }

    #[test]
    fn permutations_are_permutations_and_depend_on_the_seed() {
        let a = permutation(1000, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, permutation(1000, 2));
        assert_eq!(a, permutation(1000, 1));
        assert_ne!(shuffle_seed(7, 0, None), shuffle_seed(7, 1, None));
        assert_ne!(shuffle_seed(7, 0, Some(0)), shuffle_seed(7, 0, Some(1)));
    }
}
