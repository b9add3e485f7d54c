//! What the gradient exchange of data-parallel training costs on these machines and links,
//! without a GPU: every rank all-reduces a model's f32 gradients (GPT-2 124M by default) in
//! the trainer's buckets, a few times, and rank 0 prints the time per step.
//!
//!     cargo build --release --features mpi --example allreduce_bench
//!     mpirun -np 2 [--hostfile hosts] target/release/examples/allreduce_bench [PRESET] [BUCKET_MB]

use std::sync::Arc;
use std::time::Instant;
use wgpt::model::{GptConfig, ParamLayout};
use wgpt::train::parallel::{all_reduce_buckets, checksum, Collective, Mpi, BUCKET_BYTES};

fn main() -> wgpt::Result<()> {
    let mpi: Arc<dyn Collective> = Arc::new(Mpi::init()?);
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "gpt2".into());
    let bucket_bytes = match args.next() {
        Some(mb) => {
            (mb.parse::<f64>()
                .map_err(|e| wgpt::Error::Config(format!("bucket megabytes '{mb}': {e}")))?
                * (1 << 20) as f64) as usize
        }
        None => BUCKET_BYTES,
    };
    let config = GptConfig::preset(&preset)?;
    let floats = ParamLayout::new(&config).total + 1; // the gradients and the loss
    let (rank, ranks) = (mpi.rank(), mpi.size());
    let mut grads: Vec<f32> = (0..floats)
        .map(|i| ((i % 1000) as f32 - 500.0) * 1e-3 * (rank + 1) as f32)
        .collect();
    let steps = 5;
    let mut times = Vec::new();
    for _ in 0..steps {
        let start = Instant::now();
        all_reduce_buckets(mpi.as_ref(), &mut grads, (bucket_bytes / 4).max(1))?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // Every rank must hold the same sums.
    let sums = mpi.all_gather(checksum(&grads))?;
    if rank == 0 {
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let mb = (floats * 4) as f64 / 1e6;
        println!(
            "{preset}: {mb:.1} MB of f32 gradients per step on {ranks} ranks, buckets of {:.1} MiB: all-reduce {ms:.1} ms per step (median of {steps}), {:.2} GB/s of gradients; ranks agree: {}",
            bucket_bytes as f64 / (1 << 20) as f64,
            mb / ms,
            sums.iter().all(|&s| s == sums[0])
        );
    }
    Ok(())
}
