//! The processes a run trains with: one alone, or with the `mpi` feature under `mpirun -np N`
//! (N > 1) a data-parallel job whose ranks exchange their gradients every step.

use super::parallel::Collective;
use crate::error::{Error, Result};
use crate::gpu::AdapterChoice;
use std::sync::Arc;

/// The job this process belongs to.
pub struct Job {
    /// The other ranks (None: this process trains alone).
    pub collective: Option<Arc<dyn Collective>>,
    /// The rank among those on this machine (picks its GPU).
    pub local_rank: usize,
    /// This machine's name (for a failing rank's message).
    pub host: String,
}

impl Job {
    /// Joins the job `mpirun` started; a process started without it, or a job of one rank,
    /// trains alone.
    #[cfg(feature = "mpi")]
    pub fn join() -> Result<Job> {
        let mpi = super::parallel::Mpi::init()?;
        let (local_rank, host) = (mpi.local_rank(), mpi.host());
        let collective: Option<Arc<dyn Collective>> = if mpi.size() > 1 {
            Some(Arc::new(mpi))
        } else {
            None
        };
        Ok(Job {
            collective,
            local_rank,
            host,
        })
    }

    /// A process alone (built without the `mpi` feature).
    #[cfg(not(feature = "mpi"))]
    pub fn join() -> Result<Job> {
        Ok(Job {
            collective: None,
            local_rank: 0,
            host: String::new(),
        })
    }

    pub fn ranks(&self) -> usize {
        self.collective.as_ref().map_or(1, |c| c.size())
    }

    pub fn rank(&self) -> usize {
        self.collective.as_ref().map_or(0, |c| c.rank())
    }

    /// The adapter this rank trains on: the one at `index` if given; else the best, or in a
    /// data-parallel job the rank on this machine modulo its GPUs.
    pub fn adapter(&self, index: Option<usize>) -> AdapterChoice {
        match (index, self.ranks()) {
            (Some(i), _) => AdapterChoice::Index(i),
            (None, 1) => AdapterChoice::Best,
            (None, _) => AdapterChoice::LocalRank(self.local_rank),
        }
    }

    /// How this job trains data-parallel, with all-reduce buckets of `bucket_mb` megabytes
    /// (None: it trains alone).
    pub fn data_parallel(&self, bucket_mb: f64) -> Result<Option<DataParallel>> {
        let Some(collective) = self.collective.clone() else {
            return Ok(None);
        };
        if !(bucket_mb > 0.0 && bucket_mb.is_finite()) {
            return Err(Error::Config(format!(
                "--bucket-mb must be a positive number of megabytes (got {bucket_mb})"
            )));
        }
        Ok(Some(DataParallel {
            collective,
            bucket_bytes: ((bucket_mb * (1 << 20) as f64) as usize).max(4),
        }))
    }
}

/// Data-parallel training: the ranks, and the bytes of gradients per all-reduce bucket (a bucket
/// is reduced as soon as the backward has finished it, while the backward of earlier layers
/// runs).
#[derive(Clone)]
pub struct DataParallel {
    pub collective: Arc<dyn Collective>,
    pub bucket_bytes: usize,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("ranks", &self.collective.size())
            .field("bucket_bytes", &self.bucket_bytes)
            .finish()
    }
}
