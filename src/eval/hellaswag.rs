//! HellaSwag as the reference recipe scores it: each example's context followed by each of its
//! four endings, the endings' tokens scored by their mean loss under the model; the ending with
//! the lowest mean loss is the model's choice (`acc_norm`).
//!
//! The data is the standard jsonl (one object per line with `ctx`, `endings` (4 strings) and
//! `label`), given by the user. An ending is encoded with a leading space, as it continues the
//! context.

use crate::data::{Batch, Tokenizer, EOT};
use crate::error::{Error, Result};
use std::path::Path;

/// One example, tokenised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub context: Vec<u32>,
    pub endings: [Vec<u32>; 4],
    /// The right ending.
    pub label: usize,
}

/// Reads a HellaSwag jsonl file: every non-empty line must be an example.
pub fn load(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Error::format(path, "not UTF-8 text; give the HellaSwag jsonl file")
        } else {
            Error::io(path, e)
        }
    })?;
    let bpe = Tokenizer::gpt2();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| {
            Error::format(
                path,
                format!(
                    "line {}: {what}; each line must be a HellaSwag example {{\"ctx\": ..., \"endings\": [4 strings], \"label\": 0-3}}",
                    i + 1
                ),
            )
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let ctx = v
            .get("ctx")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad("no string \"ctx\""))?;
        let endings: Vec<&str> = v
            .get("endings")
            .and_then(|e| e.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if endings.len() != 4 {
            return Err(bad("\"endings\" must hold 4 strings"));
        }
        let label = v
            .get("label")
            .and_then(|l| {
                l.as_u64()
                    .or_else(|| l.as_str().and_then(|s| s.parse().ok()))
            })
            .filter(|&l| l < 4)
            .ok_or_else(|| bad("\"label\" must be 0, 1, 2 or 3"))? as usize;
        out.push(Example {
            context: bpe.encode(ctx),
            endings: std::array::from_fn(|j| bpe.encode(&format!(" {}", endings[j]))),
            label,
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no examples in the file"));
    }
    Ok(out)
}

/// One of the four rows of an example: where its ending's predictions are in the row.
#[derive(Clone, Copy, Debug)]
struct RowSpan {
    /// Positions `first..first + len` predict the ending's tokens.
    first: usize,
    len: usize,
}

/// An example's row of at most `t + 1` tokens: context then ending. A context that does not
/// fit is cut from the left; an ending longer than `t` tokens is refused.
fn row(e: &Example, j: usize, t: usize) -> Result<(Vec<u32>, RowSpan)> {
    let end = &e.endings[j];
    if end.is_empty() || end.len() > t {
        return Err(Error::Config(format!(
            "a HellaSwag ending of {} tokens does not fit sequences of T = {t}",
            end.len()
        )));
    }
    let keep = (t + 1 - end.len()).min(e.context.len());
    let mut tokens = e.context[e.context.len() - keep..].to_vec();
    if tokens.is_empty() {
        // No context: the ending is predicted from <|endoftext|>.
        tokens.push(EOT);
    }
    let first = tokens.len() - 1;
    tokens.extend_from_slice(end);
    Ok((
        tokens,
        RowSpan {
            first,
            len: end.len(),
        },
    ))
}

/// What an evaluation found.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
    /// Each example's mean ending losses and its choice.
    pub losses: Vec<[f64; 4]>,
    pub choices: Vec<usize>,
}

impl Score {
    pub fn acc_norm(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Scores `examples` with `position_losses`, which takes batches of `b` rows of `t` tokens and
/// returns each position's loss: the four rows of every example are packed into batches,
/// padded with <|endoftext|> (padding is never scored).
pub fn evaluate(
    examples: &[Example],
    b: usize,
    t: usize,
    mut position_losses: impl FnMut(&[Batch]) -> Result<Vec<Vec<f32>>>,
) -> Result<Score> {
    let mut rows = Vec::with_capacity(examples.len() * 4);
    for e in examples {
        for j in 0..4 {
            rows.push(row(e, j, t)?);
        }
    }
    // Mean loss of every row's ending.
    let mut row_loss = Vec::with_capacity(rows.len());
    for group in rows.chunks(b) {
        let mut batch = Batch {
            x: vec![EOT; b * t],
            y: vec![EOT; b * t],
        };
        for (r, (tokens, _)) in group.iter().enumerate() {
            let n = tokens.len() - 1;
            batch.x[r * t..r * t + n].copy_from_slice(&tokens[..n]);
            batch.y[r * t..r * t + n].copy_from_slice(&tokens[1..]);
        }
        let losses = position_losses(std::slice::from_ref(&batch))?;
        let losses = &losses[0];
        for (r, (_, span)) in group.iter().enumerate() {
            let at = r * t + span.first;
            let sum: f64 = losses[at..at + span.len].iter().map(|&l| l as f64).sum();
            row_loss.push(sum / span.len as f64);
        }
    }
    Ok(score(examples, &row_loss))
}

/// The choices and accuracy from each row's mean ending loss (4 rows per example).
pub fn score(examples: &[Example], row_loss: &[f64]) -> Score {
    let mut s = Score {
        correct: 0,
        total: examples.len(),
        losses: Vec::with_capacity(examples.len()),
        choices: Vec::with_capacity(examples.len()),
    };
    for (e, l) in examples.iter().zip(row_loss.chunks(4)) {
        let l: [f64; 4] = [l[0], l[1], l[2], l[3]];
        let choice = (0..4)
            .min_by(|&a, &b| l[a].total_cmp(&l[b]))
            .expect("four endings");
        if choice == e.label {
            s.correct += 1;
        }
        s.losses.push(l);
        s.choices.push(choice);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cut_the_context_from_the_left_and_keep_the_ending() {
        let e = Example {
            context: vec![1, 2, 3, 4, 5],
            endings: [vec![10, 11], vec![12], vec![13, 14, 15], vec![16]],
            label: 0,
        };
        let (r, s) = row(&e, 0, 8).unwrap();
        assert_eq!(r, vec![1, 2, 3, 4, 5, 10, 11]);
        assert_eq!((s.first, s.len), (4, 2));
        // T = 4: 5 tokens in a row, the ending's 3 and the context's last 2.
        let (r, s) = row(&e, 2, 4).unwrap();
        assert_eq!(r, vec![4, 5, 13, 14, 15]);
        assert_eq!((s.first, s.len), (1, 3));
        assert!(row(&e, 2, 2).is_err());
    }
}
