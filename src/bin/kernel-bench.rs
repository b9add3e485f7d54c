//! Kernel benchmark: GFLOP/s of the matmuls at GPT-2 (124M)'s shapes and of attention forward
//! and backward, on the chosen adapter. On a CPU adapter the shapes are scaled down (the
//! software rasteriser runs about a thousand times slower) and the table says so.
//!
//! `cargo run --release --bin kernel-bench [-- --precision f32|f16 --reps N --kernel K]`
//!
//! `--kernel auto` (the default) runs what the launchers choose, `tiled` forces the tiled kernel
//! and `coop` the cooperative-matrix (tensor core) kernel, which needs `--precision f16`. Each
//! matmul row says which kernel ran; a cooperative-matrix row also gives its relative difference
//! from the tiled kernel on the same inputs (`--no-check` skips that). To see tensor cores on an
//! NVIDIA GPU against the tiled kernel:
//!
//! `cargo run --release --bin kernel-bench -- --precision f16 --kernel coop`
//! `cargo run --release --bin kernel-bench -- --precision f16 --kernel tiled`
//!
//! The last matmul rows run one weight gradient whole and split along its rows (split-K); the
//! kernel column then ends in `/S`, the number of K slices.

use clap::Parser;
use std::process::ExitCode;
use std::time::Instant;
use wgpt::error::Result;
use wgpt::gpu::{DType, Dispatch, Gpu, GpuOptions};
use wgpt::ops::attention;
use wgpt::ops::matmul::{
    self, MatmulBackwardInput, MatmulBackwardWeight, MatmulForward, MatmulKernel,
};
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
    /// Matmul kernel: auto (the launchers' choice), tiled, coop (cooperative matrices), or
    /// coop-emulated (the same kernel with its matrix operations in plain WGSL, for adapters
    /// without cooperative matrices).
    #[arg(long, default_value = "auto")]
    kernel: String,
    /// Skip comparing the cooperative-matrix kernel's outputs with the tiled kernel's.
    #[arg(long)]
    no_check: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum KernelChoice {
    Auto,
    Tiled,
    Coop,
    /// The cooperative-matrix kernel with its matrix operations in plain WGSL, 64x64 tiles:
    /// runs where there are no tensor cores, to check the kernel and this tool there (on Mesa's
    /// software rasteriser only up to an inner dimension of about 3000: it ends long loops).
    CoopEmulated,
}

/// The kernel for a `rows x cols` output under `choice`.
fn pick(
    gpu: &Gpu,
    choice: KernelChoice,
    rows: usize,
    cols: usize,
    dt: DType,
) -> Result<MatmulKernel> {
    match choice {
        KernelChoice::Auto => matmul::auto_kernel(gpu, rows, cols, dt, dt),
        KernelChoice::Tiled => matmul::best_tiled_kernel(gpu, rows, cols),
        KernelChoice::Coop => matmul::best_coop_kernel(gpu, rows, cols),
        KernelChoice::CoopEmulated => Ok(MatmulKernel::CoopEmulated(
            matmul::COOP_TILES[matmul::COOP_TILES.len() - 1],
        )),
    }
}

/// Runs the product built by `build` into fresh poisoned outputs with `kernel` and with the
/// tiled kernel; returns the relative difference (max-norm), or why it could not be had.
fn against_tiled(
    gpu: &Gpu,
    shape: &[usize],
    dt: DType,
    kernel: MatmulKernel,
    tiled: MatmulKernel,
    build: &dyn Fn(&wgpt::gpu::Tensor, MatmulKernel) -> Result<Dispatch>,
) -> Result<String> {
    let got = gpu.zeros("check candidate", shape, dt)?;
    let want = gpu.zeros("check tiled", shape, dt)?;
    gpu.poison(&got)?;
    gpu.poison(&want)?;
    gpu.run(&[&build(&got, kernel)?, &build(&want, tiled)?])?;
    Ok(
        match matmul::relative_difference(&gpu.read(&got)?, &gpu.read(&want)?) {
            Ok(e) => format!("{e:.2e}"),
            Err(why) => format!("FAILED: {why}"),
        },
    )
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
    let choice = match args.kernel.as_str() {
        "auto" => KernelChoice::Auto,
        "tiled" => KernelChoice::Tiled,
        "coop" if dt == DType::F16 => KernelChoice::Coop,
        "coop-emulated" if dt == DType::F16 => KernelChoice::CoopEmulated,
        "coop" | "coop-emulated" => {
            return Err(wgpt::Error::Config(
                "the cooperative-matrix kernel takes f16 operands: add --precision f16".into(),
            ))
        }
        other => {
            return Err(wgpt::Error::Config(format!(
                "--kernel {other}: expected auto, tiled, coop or coop-emulated"
            )))
        }
    };
    match choice {
        KernelChoice::Coop => {
            // Forced: runs whatever the self-check would say, but say what it says.
            matmul::best_coop_kernel(&gpu, 1, 1)?;
            for tile in matmul::COOP_TILES {
                let k = MatmulKernel::Coop(tile);
                match matmul::agreement_with_tiled(&gpu, k) {
                    Ok(e) => println!("self-check {k}: agrees with the tiled kernel ({e:.2e})"),
                    Err(why) => println!("self-check {k}: FAILED: {why}"),
                }
            }
        }
        KernelChoice::Auto if dt == DType::F16 => match matmul::coop_matmul_status(&gpu) {
            Ok(()) => println!("cooperative matrices: enabled (self-check passed)"),
            Err(why) => println!("cooperative matrices: not used: {why}"),
        },
        _ => {}
    }
    println!(
        "matmul {} inputs, f32 accumulation; {scale_note}; {reps} reps",
        dt.name()
    );
    println!(
        "{:<34} {:>7} {:>7} {:>7} {:>10} {:>9}  {:<14} {:>9}",
        "product", "M", "K", "N", "ms", "GFLOP/s", "kernel", "vs tiled"
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
        // (what, (M, K, N) of the product, output shape and dtype)
        let cases = [
            ("forward", (m, k, n), [m, n], dt),
            ("backward input", (m, n, k), [m, k], dt),
            ("backward weight", (n, m, k), [n, k], DType::F32),
        ];
        for (what, (mm, kk, nn), out_shape, out_dt) in cases {
            let kernel = pick(&gpu, choice, mm, nn, dt)?;
            let build = |o: &wgpt::gpu::Tensor, kern: MatmulKernel| -> Result<Dispatch> {
                match what {
                    "forward" => matmul::matmul_forward(
                        &gpu,
                        o,
                        &inp,
                        &w,
                        &MatmulForward {
                            kernel: Some(kern),
                            ..Default::default()
                        },
                    ),
                    "backward input" => matmul::matmul_backward_input(
                        &gpu,
                        o,
                        &out,
                        &w,
                        &MatmulBackwardInput {
                            kernel: Some(kern),
                            ..Default::default()
                        },
                    ),
                    _ => matmul::matmul_backward_weight(
                        &gpu,
                        o,
                        &out,
                        &inp,
                        &MatmulBackwardWeight {
                            kernel: Some(kern),
                            ..Default::default()
                        },
                    ),
                }
            };
            // The timed dispatch writes the tensors the other products read (as in training,
            // the weight gradient accumulates).
            let d = match what {
                "forward" => build(&out, kernel)?,
                "backward input" => build(&dinp, kernel)?,
                _ => matmul::matmul_backward_weight(
                    &gpu,
                    &dw,
                    &out,
                    &inp,
                    &MatmulBackwardWeight {
                        accumulate: true,
                        kernel: Some(kernel),
                        ..Default::default()
                    },
                )?,
            };
            let s = time(&gpu, &[d], reps)?;
            let check = match kernel {
                MatmulKernel::Coop(_) | MatmulKernel::CoopEmulated(_) if !args.no_check => {
                    let tiled = matmul::best_tiled_kernel(&gpu, mm, nn)?;
                    against_tiled(&gpu, &out_shape, out_dt, kernel, tiled, &build)?
                }
                _ => "-".to_string(),
            };
            let flops = matmul::matmul_flops(mm, kk, nn);
            println!(
                "{:<34} {:>7} {:>7} {:>7} {:>10.3} {:>9.1}  {:<14} {:>9}",
                format!("{name} {what}"),
                mm,
                kk,
                nn,
                s * 1e3,
                flops / s / 1e9,
                kernel.to_string(),
                check
            );
        }
    }

    // Split-K: attn.c_proj's weight gradient (C x C, summed over all rows) makes too few tiles
    // to fill a large GPU; whole (the kernel and tile the launcher takes without a scratch) and
    // split along the rows into a scratch, then summed. Rows 4096 on a CPU adapter (the least
    // that splits in four).
    let split_m = if cpu { 4096 } else { m };
    let (n, k) = (c, c);
    let dout = gpu.upload(
        "dout",
        &rng.vec_uniform(split_m * n, -1.0, 1.0),
        &[split_m, n],
        dt,
    )?;
    let inp = gpu.upload(
        "inp",
        &rng.vec_uniform(split_m * k, -1.0, 1.0),
        &[split_m, k],
        dt,
    )?;
    let dw = gpu.zeros("dw", &[n, k], DType::F32)?;
    let scratch_len = matmul::matmul_backward_weight_scratch_len(n, k, split_m);
    let scratch = gpu.zeros("scratch", &[scratch_len.max(1)], DType::F32)?;
    for (what, scratch) in [("whole", None), ("split", Some(&scratch))] {
        let scratch_len = scratch.map_or(0, |s| s.len());
        let (auto, slices) =
            matmul::backward_weight_choice(&gpu, (n, k), split_m, (dt, dt), scratch_len)?;
        let kernel = match choice {
            KernelChoice::Auto => auto,
            _ => pick(&gpu, choice, n, k, dt)?,
        };
        let ds = matmul::matmul_backward_weight_split(
            &gpu,
            &dw,
            &dout,
            &inp,
            scratch,
            &MatmulBackwardWeight {
                accumulate: true,
                kernel: Some(kernel),
                splits: Some(slices),
                ..Default::default()
            },
        )?;
        let s = time(&gpu, &ds, reps)?;
        let slices = if slices > 1 {
            format!(" /{slices}")
        } else {
            String::new()
        };
        println!(
            "{:<34} {:>7} {:>7} {:>7} {:>10.3} {:>9.1}  {:<14} {:>9}",
            format!("attn.c_proj backward weight {what}"),
            n,
            split_m,
            k,
            s * 1e3,
            matmul::matmul_flops(n, split_m, k) / s / 1e9,
            format!("{kernel}{slices}"),
            "-"
        );
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
                &gpu,
                &attention::AttentionBackward {
                    dqkv: &dqkv,
                    dout: &dout,
                    qkv: &qkv,
                    out: &out,
                    lse: &lse,
                    d_scratch: &dscratch,
                    b,
                    t,
                    nh,
                },
            )?,
            bwd_flops,
        ),
    ];
    // On cooperative matrices where the self-check passed (f16 only).
    match attention::auto_coop_attention(&gpu, hs, dt) {
        Some(cfg) => {
            rows.push((
                "coop forward",
                attention::coop_attention_forward(
                    &gpu,
                    cfg,
                    &attention::AttentionForward {
                        out: &out,
                        lse: &lse,
                        qkv: &qkv,
                        b,
                        t,
                        nh,
                    },
                )?,
                fwd_flops,
            ));
            rows.push((
                "coop backward",
                attention::coop_attention_backward(
                    &gpu,
                    cfg,
                    &attention::AttentionBackward {
                        dqkv: &dqkv,
                        dout: &dout,
                        qkv: &qkv,
                        out: &out,
                        lse: &lse,
                        d_scratch: &dscratch,
                        b,
                        t,
                        nh,
                    },
                )?,
                bwd_flops,
            ));
            println!("cooperative-matrix attention: {cfg:?}");
        }
        None => match attention::coop_attention_status(&gpu) {
            Err(why) if dt == DType::F16 => println!("no cooperative-matrix attention: {why}"),
            _ => {}
        },
    }
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
            attention::naive_attention_backward(
                &gpu,
                &attention::NaiveAttentionBackward {
                    dqkv: &dqkv,
                    datt_scratch: &datt,
                    dout: &dout,
                    qkv: &qkv,
                    att: &att,
                    b,
                    t,
                    nh,
                },
            )?,
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
