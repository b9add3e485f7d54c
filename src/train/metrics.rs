//! The metrics file: one JSON object per line for each step, validation and HellaSwag score of a
//! run, flushed as written.

use super::run::RunEvent;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A metrics file open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: BufWriter<File>,
}

impl MetricsLog {
    /// Opens `path` to append to (created if missing).
    pub fn open(path: &Path) -> Result<MetricsLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file: BufWriter::new(file),
        })
    }

    /// Writes the event's line; samples, saves and replica checks have none.
    pub fn record(&mut self, e: &RunEvent) -> Result<()> {
        let row = match e {
            RunEvent::Step { stats: s, .. } => {
                let mut row = serde_json::json!({
                    "step": s.step, "loss": s.loss, "lr": s.lr, "norm": s.norm, "dt_ms": s.dt_ms,
                    "tok_per_sec": s.tok_per_sec, "skipped": s.skipped, "loss_scale": s.loss_scale,
                    "encode_ms": s.encode_ms, "submit_ms": s.submit_ms,
                });
                if let Some(r) = s.reduce {
                    row["all_reduce_ms"] = r.all_reduce_ms.into();
                }
                row
            }
            RunEvent::Validation { step, loss } => {
                serde_json::json!({ "step": step, "val_loss": loss })
            }
            RunEvent::HellaSwag { step, score } => serde_json::json!({
                "step": step, "hellaswag_acc_norm": score.acc_norm(),
                "hellaswag_correct": score.correct, "hellaswag_total": score.total,
            }),
            _ => return Ok(()),
        };
        writeln!(self.file, "{row}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}
