//! Kernel benchmark: GFLOP/s of the matmuls at GPT-2 (124M)'s shapes and of attention forward
//! and backward, on the chosen adapter. On a CPU adapter the shapes are scaled down (the
//! software rasteriser runs about a thousand times slower) and the table says so.
//!
//! `cargo run --release --bin kernel-bench [-- --precision f32|f16 --reps N]`

use clap::Parser;
use std::process::ExitCode;
use std::time::Instant;
use wgpt::error::Result;
use wgpt::gpu::{DType, Dispatch, Gpu, GpuOptions};
use wgpt::ops::attention;
use wgpt::ops::matmul::{self, MatmulBackwardInput, MatmulForward};
use wgpt::rng::Rng;

#[derive(Parser, Debug)]
#[command(
    name = "kernel-bench",
    about = "GFLOP/s of wgpt's matmul and attention kernels"
)]
struct Args {
    /// Storage dtype of the inputs: f32, or f16 (f32 accumulation).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Timed repetitions per kernel (after one warm-up).
    #[arg(long)]
    reps: Option<usize>,
}

/// Runs `dispatches` `reps` times in one submission; returns seconds per repetition.
fn time(gpu: &Gpu, dispatches: &[Dispatch], reps: usize) -> Result<f64> {
    let all: Vec<&Dispatch> = dispatches.iter().collect();
    gpu.run(&all)?; // warm-up (pipeline creation, caches)
    let many: Vec<&Dispatch> = (0..reps).flat_map(|_| all.iter().copied()).collect();
    let start = Instant::now();
    gpu.run(&many)?;
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn run(args: Args) -> Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("{}", gpu.summary());
    let dt = match args.precision.as_str() {
        "f16" if gpu.has_f16() => DType::F16,
        "f16" => {
            return Err(wgpt::Error::Config(
                "the adapter has no SHADER_F16; use --precision f32".into(),
            ))
        }
        _ => DType::F32,
    };
    let cpu = gpu.is_cpu();
    // GPT-2 124M at B=16, T=1024; scaled by 1/4 in width and 1/128 in rows on a CPU adapter.
    let (m, c, v, scale_note) = if cpu {
        (
            128,
            192,
            12576,
            "scaled for a CPU adapter: rows 128, C 192, vocab 12576 (GPT-2 is 16384, 768, 50304)",
        )
    } else {
        (16384, 768, 50304, "GPT-2 124M at B=16, T=1024")
    };
    let reps = args.reps.unwrap_or(if cpu { 2 } else { 20 });
    println!(
        "matmul {} inputs, f32 accumulation; {scale_note}; {reps} reps",
        dt.name()
    );
    println!(
        "{:<34} {:>7} {:>7} {:>7} {:>10} {:>9}",
        "product", "M", "K", "N", "ms", "GFLOP/s"
    );
    let mut rng = Rng::new(1);
    let shapes = [
        ("attn.c_attn", c, 3 * c),
        ("attn.c_proj", c, c),
        ("mlp.c_fc", c, 4 * c),
        ("mlp.c_proj", 4 * c, c),
        ("lm_head", c, v),
    ];
    for (name, k, n) in shapes {
        let inp = gpu.upload("inp", &rng.vec_uniform(m * k, -1.0, 1.0), &[m, k], dt)?;
        let w = gpu.upload("w", &rng.vec_uniform(n * k, -1.0, 1.0), &[n, k], dt)?;
        let out = gpu.zeros("out", &[m, n], dt)?;
        let dinp = gpu.zeros("dinp", &[m, k], dt)?;
        let dw = gpu.zeros("dw", &[n, k], DType::F32)?;
        let cases: [(&str, Dispatch); 3] = [
            (
                "forward",
                matmul::matmul_forward(&gpu, &out, &inp, &w, &MatmulForward::default())?,
            ),
            (
                "backward input",
                matmul::matmul_backward_input(
                    &gpu,
                    &dinp,
                    &out,
                    &w,
                    &MatmulBackwardInput::default(),
                )?,
            ),
            (
                "backward weight",
                matmul::matmul_backward_weight(&gpu, &dw, &out, &inp, true)?,
            ),
        ];
        for (what, d) in cases {
            let s = time(&gpu, &[d], reps)?;
            let (mm, kk, nn) = match what {
                "forward" => (m, k, n),
                "backward input" => (m, n, k),
                _ => (n, m, k),
            };
            let flops = matmul::matmul_flops(mm, kk, nn);
            println!(
                "{:<34} {:>7} {:>7} {:>7} {:>10.3} {:>9.1}",
                format!("{name} {what}"),
                mm,
                kk,
                nn,
                s * 1e3,
                flops / s / 1e9
            );
        }
    }

    let (b, t, nh, hs) = if cpu {
        (1, 256, 4, 64)
    } else {
        (16, 1024, 12, 64)
    };
    let cc = nh * hs;
    println!(
        "attention {} B={b} T={t} heads={nh} head size={hs} (causal)",
        dt.name()
    );
    let qkv = gpu.upload(
        "qkv",
        &rng.vec_uniform(b * t * 3 * cc, -1.0, 1.0),
        &[b * t, 3 * cc],
        dt,
    )?;
    let out = gpu.zeros("out", &[b * t, cc], dt)?;
    let dout = gpu.upload(
        "dout",
        &rng.vec_uniform(b * t * cc, -1.0, 1.0),
        &[b * t, cc],
        dt,
    )?;
    let dqkv = gpu.zeros("dqkv", &[b * t, 3 * cc], dt)?;
    let lse = gpu.zeros("lse", &[b, nh, t], DType::F32)?;
    let dscratch = gpu.zeros("D", &[b, nh, t], DType::F32)?;
    let fwd_flops = attention::attention_flops(b, t, nh, hs) as f64;
    let bwd_flops = attention::attention_backward_flops(b, t, nh, hs) as f64;
    let mut rows: Vec<(&str, Vec<Dispatch>, f64)> = vec![
        (
            "flash forward",
            attention::flash_attention_forward(&gpu, &out, &lse, &qkv, b, t, nh)?,
            fwd_flops,
        ),
        (
            "flash backward",
            attention::flash_attention_backward(
                &gpu, &dqkv, &dout, &qkv, &out, &lse, &dscratch, b, t, nh,
            )?,
            bwd_flops,
        ),
    ];
    let att_bytes = (b * nh * t * t * 4) as u64;
    if att_bytes <= gpu.limits.max_storage_buffer_binding_size {
        let att = gpu.zeros("att", &[b, nh, t, t], DType::F32)?;
        let datt = gpu.zeros("datt", &[b, nh, t, t], DType::F32)?;
        rows.push((
            "naive forward",
            attention::naive_attention_forward(&gpu, &out, &att, &qkv, b, t, nh)?,
            fwd_flops,
        ));
        rows.push((
            "naive backward",
            attention::naive_attention_backward(&gpu, &dqkv, &datt, &dout, &qkv, &att, b, t, nh)?,
            bwd_flops,
        ));
    }
    println!("{:<34} {:>10} {:>9}", "kernel", "ms", "GFLOP/s");
    for (name, ds, flops) in rows {
        let s = time(&gpu, &ds, reps)?;
        println!("{:<34} {:>10.3} {:>9.1}", name, s * 1e3, flops / s / 1e9);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
