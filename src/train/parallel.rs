//! Data-parallel training: one process per GPU, each reading its own slice of every batch, the
//! gradients summed across processes before the optimiser step, which then runs identically on
//! every process so that the weights stay identical.
//!
//! The engine does not write a network layer of its own: the sums go through a [`Collective`],
//! which with the `mpi` feature is MPI's all-reduce ([`Mpi`]); `mpirun -np N headless-train ...`
//! starts the processes. Without the feature every run is a single process.
//!
//! The gradients are reduced in buckets, each as soon as the backward has finished it, while
//! the backward of earlier layers runs ([`crate::train::trainer::Trainer::data_parallel`]).
//!
//! How a step is divided: each rank's loss gradient is seeded with `scale / (ranks * B * T *
//! grad_accum)` and its loss with the same weight, so the sum over ranks of the gradients (and
//! losses) equals what one process with `grad_accum * ranks` micro-batches computes over the same
//! tokens. Rank r reads the (k * ranks + r)-th B*T batch of the step's stream in its micro-step
//! k, as the reference's distributed loader offsets by rank; the loader's position stays the same
//! on every rank, and a checkpoint's position is valid for any number of ranks.

use crate::error::{Error, Result};

/// The default bucket of gradients reduced together (25 MiB, PyTorch's DistributedDataParallel's):
/// a bucket is reduced as soon as the backward has finished all of it, while the backward of
/// earlier layers runs, and no all-reduce call is larger.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The collective operations data-parallel training needs, across the processes of one job.
/// Every rank must make the same calls in the same order.
pub trait Collective: Send + Sync {
    /// This process's index in the job, 0-based; rank 0 alone logs, evaluates and saves.
    fn rank(&self) -> usize;
    /// Processes in the job.
    fn size(&self) -> usize;
    /// Replaces `data` on every rank with the element-wise sum over the ranks (the same bits on
    /// every rank).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// Every rank's `value`, in rank order, on every rank.
    fn all_gather(&self, value: u64) -> Result<Vec<u64>>;
    /// Ends every process of the job (a rank that failed: the others would wait for it forever).
    fn abort(&self, code: i32) -> !;
}

/// FNV-1a over the bits of `values`: a checksum of a rank's weights, which must be equal on
/// every rank after every step.
pub fn checksum(values: &[f32]) -> u64 {
    fingerprint(values.iter().flat_map(|v| v.to_bits().to_le_bytes()))
}

/// FNV-1a over `bytes`.
pub fn fingerprint(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The first rank whose `value` differs from rank 0's, if any (on every rank).
pub fn first_disagreeing(c: &dyn Collective, value: u64) -> Result<Option<usize>> {
    let all = c.all_gather(value)?;
    Ok(all.iter().position(|&v| v != all[0]))
}

/// Sums `data` across the ranks, at most `floats` per call.
pub fn all_reduce_buckets(c: &dyn Collective, data: &mut [f32], floats: usize) -> Result<()> {
    for bucket in data.chunks_mut(floats.max(1)) {
        c.all_reduce_sum(bucket)?;
    }
    Ok(())
}

/// Checks that every rank holds the same weights (their checksums agree); returns the checksum.
pub fn check_replicas(c: &dyn Collective, params: &[f32]) -> Result<u64> {
    let mine = checksum(params);
    let all = c.all_gather(mine)?;
    if all.iter().any(|&h| h != all[0]) {
        let list: Vec<String> = all
            .iter()
            .enumerate()
            .map(|(r, h)| format!("rank {r}: {h:016x}"))
            .collect();
        return Err(Error::Other(format!(
            "the ranks' weights differ ({}); the gradients were not reduced to the same sums. \
             Resume from the last checkpoint",
            list.join(", ")
        )));
    }
    Ok(mine)
}

#[cfg(feature = "mpi")]
pub use self::mpi_impl::Mpi;

#[cfg(feature = "mpi")]
mod mpi_impl {
    use super::Collective;
    use crate::error::{Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::environment::{Threading, Universe};
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use std::sync::Mutex;

    /// MPI's world communicator (the processes `mpirun` started).
    pub struct Mpi {
        world: SimpleCommunicator,
        rank: usize,
        size: usize,
        local_rank: usize,
        /// Held during every MPI call (MPI is initialised for serialised calls), with the
        /// all-reduce's scratch.
        calls: Mutex<Vec<f32>>,
        /// Finalises MPI when dropped: kept last.
        _universe: Universe,
    }

    // SAFETY: MPI is initialised at MPI_THREAD_SERIALIZED (checked in `init`): any thread may
    // call it, one at a time, which the `calls` mutex ensures for every call but `abort` (a
    // failed rank's last act, made by the thread that owns the run). The communicator's handle
    // is a plain value valid in every thread of the process.
    unsafe impl Send for Mpi {}
    unsafe impl Sync for Mpi {}

    impl Mpi {
        /// Initialises MPI (once per process). A process started without `mpirun` is a job of
        /// one rank.
        pub fn init() -> Result<Mpi> {
            let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| Error::Other("MPI was initialised twice in this process".into()))?;
            if matches!(level, Threading::Single | Threading::Funneled) {
                return Err(Error::Other(format!(
                    "this MPI library offers thread level {level:?}; data-parallel training needs Serialized (Open MPI offers it)"
                )));
            }
            let world = universe.world();
            // The ranks on this machine, for the choice of a GPU each.
            let local_rank = world.split_shared(world.rank()).rank() as usize;
            Ok(Mpi {
                rank: world.rank() as usize,
                size: world.size() as usize,
                world,
                local_rank,
                calls: Mutex::new(Vec::new()),
                _universe: universe,
            })
        }

        /// This process's index among the ranks on its machine.
        pub fn local_rank(&self) -> usize {
            self.local_rank
        }

        /// The machine's name as MPI knows it (for messages).
        pub fn host(&self) -> String {
            let _serial = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            mpi::environment::processor_name().unwrap_or_else(|_| "?".into())
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }

        fn size(&self) -> usize {
            self.size
        }

        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
            let mut recv = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            recv.resize(data.len(), 0.0);
            // MPI's default error handler aborts the job on a failed collective.
            self.world
                .all_reduce_into(&data[..], &mut recv[..], SystemOperation::sum());
            data.copy_from_slice(&recv);
            Ok(())
        }

        fn all_gather(&self, value: u64) -> Result<Vec<u64>> {
            let _serial = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            let mut all = vec![0u64; self.size];
            self.world.all_gather_into(&value, &mut all[..]);
            Ok(all)
        }

        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_every_bit() {
        let a = [1.0f32, 2.0, 3.0];
        let mut b = a;
        b[2] = f32::from_bits(b[2].to_bits() ^ 1);
        assert_ne!(checksum(&a), checksum(&b));
        assert_eq!(checksum(&a), checksum(&[1.0, 2.0, 3.0]));
    }
}
