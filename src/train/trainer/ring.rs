//! The ring of steps in flight: each queued step copies its statistics (loss, gradient norm and
//! the step state) into a read-back slot of its own, whose mapping is requested as the step is
//! submitted. A finished step is then found without blocking ([`Ring::ready`], after a
//! non-blocking device poll), or waited for on native ([`Ring::wait`]); either way its slot is
//! read and freed in submission order.

use super::ReduceStats;
use crate::error::{Error, Result};
use crate::gpu::profile::Profiler;
use crate::gpu::Gpu;
use crate::ops::optimizer;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Steps that may be queued at once: the GPU runs one while the CPU encodes the next.
pub const PIPELINE_DEPTH: usize = 2;

/// Bytes of one step's read-back: loss (f32) at 0, status ([`optimizer::STATUS_LEN`] f32) at 16,
/// [`optimizer::StepState`] at 32.
pub(super) const STATS_BYTES: u64 = 64;

/// Where a slot's mapping stands.
const MAPPING: u8 = 0;
const MAPPED: u8 = 1;
const FAILED: u8 = 2;

/// One read-back buffer of the ring, with its profiler when profiling.
pub(super) struct Slot {
    pub staging: wgpu::Buffer,
    pub profiler: Option<Profiler>,
    /// Set by the mapping's callback.
    mapped: Arc<AtomicU8>,
}

/// A step queued and not yet collected.
pub(super) struct Pending {
    pub slot: usize,
    pub step: usize,
    pub lr: f64,
    pub submitted: Instant,
    pub encode_ms: f64,
    pub submit_ms: f64,
    pub index: wgpu::SubmissionIndex,
    pub reduce: Option<ReduceStats>,
}

/// What a finished step's slot held.
pub(super) struct Finished {
    pub pending: Pending,
    pub loss: f32,
    pub norm: f32,
    pub state: optimizer::StepState,
}

pub(super) struct Ring {
    pub slots: Vec<Slot>,
    pub pending: VecDeque<Pending>,
}

impl Ring {
    pub fn new(gpu: &Gpu) -> Ring {
        let slots = (0..PIPELINE_DEPTH)
            .map(|i| Slot {
                staging: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("step statistics read-back {i}")),
                    size: STATS_BYTES,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                profiler: None,
                mapped: Arc::new(AtomicU8::new(MAPPING)),
            })
            .collect();
        Ring {
            slots,
            pending: VecDeque::new(),
        }
    }

    /// A slot no queued step uses, or an error when [`PIPELINE_DEPTH`] steps are in flight.
    pub fn free_slot(&self) -> Result<usize> {
        (0..self.slots.len())
            .find(|i| self.pending.iter().all(|p| p.slot != *i))
            .ok_or_else(|| {
                Error::Other(format!(
                    "{PIPELINE_DEPTH} steps are already in flight: collect one first"
                ))
            })
    }

    /// Records a submitted step and asks for its slot's mapping, which completes once the
    /// step has run.
    pub fn push(&mut self, p: Pending) {
        let slot = &self.slots[p.slot];
        slot.mapped.store(MAPPING, Ordering::Release);
        let flag = slot.mapped.clone();
        slot.staging
            .slice(..STATS_BYTES)
            .map_async(wgpu::MapMode::Read, move |r| {
                flag.store(if r.is_ok() { MAPPED } else { FAILED }, Ordering::Release);
            });
        self.pending.push_back(p);
    }

    /// Whether the oldest queued step has finished, without blocking (the device is polled
    /// once; in a browser the event loop delivers the mapping instead).
    pub fn ready(&self, gpu: &Gpu) -> Result<bool> {
        let Some(p) = self.pending.front() else {
            return Ok(false);
        };
        if self.slots[p.slot].mapped.load(Ordering::Acquire) == MAPPING {
            gpu.device
                .poll(wgpu::PollType::Poll)
                .map_err(|e| Error::Gpu(format!("polling the GPU failed: {e}")))?;
            gpu.check_lost()?;
        }
        Ok(self.slots[p.slot].mapped.load(Ordering::Acquire) != MAPPING)
    }

    /// Blocks until the oldest queued step has finished (native only).
    pub fn wait(&self, gpu: &Gpu) -> Result<()> {
        let p = self
            .pending
            .front()
            .ok_or_else(|| Error::Other("no step in flight to collect".into()))?;
        gpu.wait_for(Some(p.index.clone()))
    }

    /// Reads and frees the oldest step's slot, which must be ready.
    pub fn take(&mut self) -> Result<Finished> {
        let p = self
            .pending
            .pop_front()
            .ok_or_else(|| Error::Other("no step in flight to collect".into()))?;
        let slot = &self.slots[p.slot];
        match slot.mapped.load(Ordering::Acquire) {
            MAPPED => {}
            FAILED => return Err(Error::Gpu("the step statistics' read-back failed".into())),
            _ => return Err(Error::Other("the step has not finished".into())),
        }
        let bytes = {
            let view = slot
                .staging
                .slice(..STATS_BYTES)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("read-back mapping failed: {e}")))?;
            view.to_vec()
        };
        slot.staging.unmap();
        let f = |i: usize| f32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Ok(Finished {
            loss: f(0),
            norm: f(16),
            state: optimizer::StepState::from_bytes(&bytes[32..])?,
            pending: p,
        })
    }
}
