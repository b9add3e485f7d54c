//! Recording a compiled step's dispatches into command buffers: in runs on several threads,
//! with timestamps between nodes when profiling.

use super::Scheduled;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Timestamps written between the nodes of a step (profiling): node `i` of the step's schedule
/// starts at query `i + offset` and the step ends at query `n + offset`; queries from
/// `capacity` on are not written. (`offset` 1 leaves a query for a pause inside the step: see
/// [`crate::gpu::profile::Profiler::begin_step`].)
#[derive(Clone, Copy)]
pub struct Marks<'a> {
    pub query_set: &'a wgpu::QuerySet,
    pub capacity: u32,
    pub offset: usize,
}

impl Marks<'_> {
    /// The same marks with queries shifted by `by` more.
    pub fn shifted(self, by: usize) -> Self {
        Marks {
            offset: self.offset + by,
            ..self
        }
    }

    fn write(&self, pass: &mut wgpu::ComputePass<'_>, index: usize) {
        if let Ok(i) = u32::try_from(index + self.offset) {
            if i < self.capacity {
                pass.write_timestamp(self.query_set, i);
            }
        }
    }
}

/// Records `nodes`, the run of a step's schedule that starts at node `first`, into `pass`;
/// with `marks`, a timestamp before each node and, when `end` says the run ends the step, one
/// after it.
pub fn record_run(
    pass: &mut wgpu::ComputePass<'_>,
    nodes: &[Scheduled<'_>],
    first: usize,
    marks: Option<Marks<'_>>,
    end: bool,
) {
    for (i, s) in nodes.iter().enumerate() {
        if let Some(m) = marks {
            m.write(pass, first + i);
        }
        for d in s.dispatches() {
            d.record(pass);
        }
    }
    if let (Some(m), true) = (marks, end) {
        m.write(pass, first + nodes.len());
    }
}

/// Dispatches below which a run is not split off: each run costs a thread and a command buffer.
const MIN_DISPATCHES_PER_RUN: usize = 96;

/// The most threads that record one step.
const MAX_RECORDING_THREADS: usize = 4;

/// Threads that record a step: `WGPT_RECORDING_THREADS` when set; else one per core up to
/// [`MAX_RECORDING_THREADS`] on a GPU, and one on a CPU adapter, where the cores that would
/// record the next step are the ones running the present one.
pub fn recording_threads(gpu: &Gpu) -> usize {
    if let Some(n) = std::env::var("WGPT_RECORDING_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.max(1);
    }
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_RECORDING_THREADS))
}

/// Splits `nodes` at node boundaries into at most `runs` runs of about equal dispatch counts;
/// returns each run's first node index (the first is 0) in order.
fn split_runs(nodes: &[Scheduled<'_>], runs: usize) -> Vec<usize> {
    let total: usize = nodes.iter().map(|s| s.dispatches().len()).sum();
    let mut starts = vec![0];
    let mut seen = 0;
    for (i, s) in nodes.iter().enumerate() {
        let next = starts.len();
        if next < runs && i > 0 && seen * runs >= next * total {
            starts.push(i);
        }
        seen += s.dispatches().len();
    }
    starts
}

/// Records `nodes[range]` (of a step's schedule, see [`CompiledGraph::schedule`]) into command
/// buffers to be submitted in order. wgpu's encoding of a compute pass (its resource tracking
/// and barriers) costs the CPU a few microseconds per dispatch, most of a step's host time; so a
/// range of many dispatches is split into runs recorded at once on up to `threads` threads. The
/// same dispatches in the same order either way, so the results are the same. With `marks`,
/// timestamps as [`record_run`] writes them, and one after the range when `end_mark`.
pub fn encode_schedule(
    gpu: &Gpu,
    label: &str,
    nodes: &[Scheduled<'_>],
    range: std::ops::Range<usize>,
    marks: Option<Marks<'_>>,
    end_mark: bool,
    threads: usize,
) -> Result<Vec<wgpu::CommandBuffer>> {
    let part = &nodes[range.clone()];
    let dispatches: usize = part.iter().map(|s| s.dispatches().len()).sum();
    let runs = (dispatches / MIN_DISPATCHES_PER_RUN).clamp(1, threads.max(1));
    let mut starts = split_runs(part, runs);
    starts.push(part.len());
    let encode_run = |w: &[usize]| {
        let (a, b) = (w[0], w[1]);
        gpu.scoped(label, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                });
                let end = end_mark && b == part.len();
                record_run(&mut pass, &part[a..b], range.start + a, marks, end);
            }
            enc.finish()
        })
    };
    if starts.len() == 2 {
        return Ok(vec![encode_run(&starts)?]);
    }
    std::thread::scope(|scope| {
        let others: Vec<_> = starts[1..]
            .windows(2)
            .map(|w| scope.spawn(move || encode_run(w)))
            .collect();
        let mut buffers = vec![encode_run(&starts[..2])?];
        for h in others {
            buffers
                .push(h.join().map_err(|_| {
                    Error::Other(format!("{label}: a recording thread panicked"))
                })??);
        }
        Ok(buffers)
    })
}
