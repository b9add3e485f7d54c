//! Every kernel with a subgroup path at every subgroup size GPUs use: 4 to 128 lanes (32 on
//! NVIDIA, 64 on AMD, 8 to 16 on Intel).
//!
//! A GPU has one subgroup size; Mesa's software driver (llvmpipe) takes it from
//! `LP_NATIVE_VECTOR_WIDTH` (bits / 32), read once per process before the Vulkan instance exists.
//! So [`every_subgroup_size_on_the_software_driver`] runs [`subgroup_kernels_match_reference`]
//! in a child process of this test binary per size, with that variable and a Mesa shader cache
//! folder of its own (the cache does not key on the width: a shader compiled at one width would
//! be reused at another). On any other adapter it runs the checks once, at the adapter's own size.
//!
//! The checks: the adapter reports the size asked for and a shader sees it; then LayerNorm
//! (forward, fused residual forward, backward), cross-entropy (forward with and without the
//! backward, loss mean), the gradient norm, the emulated cooperative-matrix matmul (forward;
//! see [`coop_emulated_matmul`]) and attention (forward and backward; see
//! [`coop_emulated_attention`]) against the CPU reference, on rows shorter and longer than the
//! workgroup so that partly filled subgroups occur.
//!
//! llvmpipe fills subgroups of 4, 8 and 16 lanes; from 32 up it reports the size but runs only
//! 16 lanes of each subgroup (Mesa 22.3 and 25.0 alike), which the reductions must and do
//! handle, and which the cooperative-matrix kernel, written for full subgroups as cooperative
//! matrices are, cannot: there it is not checked (the output says so). Full subgroups of 32 and
//! more are checked on GPUs only.

use crate::common::*;
use std::process::Command;
use std::time::Instant;
use wgpt::gpu::{DType, Tensor};
use wgpt::ops::attention as attn;
use wgpt::ops::crossentropy as ce;
use wgpt::ops::layernorm as ln;
use wgpt::ops::matmul::{self as mm, MatmulForward, MatmulKernel, COOP_TILES};
use wgpt::ops::optimizer::{self as opt, GradNormScalars};
use wgpt::reference as cpu;

/// The subgroup sizes llvmpipe is run at: from 4 (its smallest vector) to 128.
const SIZES: [u32; 6] = [4, 8, 16, 32, 64, 128];

/// Set by the parent in each child: the subgroup size the adapter must report.
const EXPECT_VAR: &str = "WGPT_EXPECT_SUBGROUP_SIZE";

/// The test each child runs.
const INNER: &str = "subgroup_kernels_match_reference";

/// [`INNER`]'s name as the test harness knows it: its path inside the test binary.
fn inner_path() -> String {
    match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::{INNER}"),
        None => INNER.to_string(),
    }
}

/// Whether the adapter is llvmpipe, whose subgroup size `LP_NATIVE_VECTOR_WIDTH` sets.
fn is_llvmpipe() -> bool {
    gpu().info.name.contains("llvmpipe")
}

#[test]
fn every_subgroup_size_on_the_software_driver() {
    if !is_llvmpipe() {
        eprintln!(
            "adapter '{}' is not llvmpipe: its subgroup size ({:?}) is fixed, so the checks run \
             once, at that size",
            gpu().info.name,
            gpu().subgroup_sizes
        );
        check_every_subgroup_kernel();
        return;
    }
    let exe = std::env::current_exe().expect("path of this test binary");
    // Beside the cache of the rest of the suite (scripts/test.sh), else in cargo's scratch folder.
    let mesa_cache_for = |size: u32| {
        let base = std::env::var_os("MESA_SHADER_CACHE_DIR")
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mesa"));
        base.join(format!("lanes-{size}"))
    };
    for size in SIZES {
        let start = Instant::now();
        let out = Command::new(&exe)
            .args([
                "--exact",
                &inner_path(),
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("LP_NATIVE_VECTOR_WIDTH", (size * 32).to_string())
            // Mesa's shader cache does not key on the width: a folder of its own per width.
            .env("MESA_SHADER_CACHE_DIR", mesa_cache_for(size))
            // No pipeline cache either: its key names the adapter, not the width.
            .env("WGPT_CACHE_DIR", "")
            .env(EXPECT_VAR, size.to_string())
            .output()
            .expect("run this test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let log = format!("{stdout}{stderr}");
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        assert!(
            out.status.success(),
            "subgroup size {size} (LP_NATIVE_VECTOR_WIDTH={}): {INNER} failed ({}); its output \
             ends:\n{}",
            size * 32,
            out.status,
            tail.join("\n")
        );
        // A filter that matched nothing would pass as well.
        assert!(
            stdout.contains("1 passed"),
            "subgroup size {size}: {INNER} did not run:\n{stdout}"
        );
        let lanes = log
            .lines()
            .find(|l| l.starts_with("subgroups:"))
            .unwrap_or("subgroups: (no report)");
        eprintln!(
            "subgroup size {size}: passed in {:.1} s; {lanes}",
            start.elapsed().as_secs_f64()
        );
    }
}

#[test]
#[ignore = "run per subgroup size by every_subgroup_size_on_the_software_driver (software driver) \
            and on GPUs by the GPU kit"]
fn subgroup_kernels_match_reference() {
    check_every_subgroup_kernel();
}

/// A named check at a subgroup size.
type Check = (&'static str, fn(u32));

fn check_every_subgroup_kernel() {
    let g = gpu();
    assert!(
        g.has_subgroups(),
        "adapter '{}' has no SUBGROUP feature: there are no subgroup paths to check",
        g.info.name
    );
    let (size, filled) = check_subgroup_size();
    let checks: [Check; 6] = [
        ("layernorm_forward", layernorm_forward),
        (
            "fused_residual_layernorm_forward",
            fused_residual_layernorm_forward,
        ),
        ("layernorm_backward", layernorm_backward),
        ("crossentropy", crossentropy),
        ("loss_mean", loss_mean),
        ("grad_norm", grad_norm),
    ];
    for (name, check) in checks {
        let start = Instant::now();
        check(size);
        eprintln!(
            "subgroups of {size}: {name} checked in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    if filled < size {
        // A cooperative matrix belongs to a whole subgroup: the kernel spreads each 16x16
        // fragment over SG lanes, and lanes that do not run leave their share unsummed.
        eprintln!(
            "subgroups of {size}: the driver runs only {filled} lanes of each subgroup; \
             matmul_coop and attention_coop need full subgroups (as cooperative matrices do), \
             so their emulated forms are not checked at this size"
        );
        return;
    }
    let coop: [Check; 2] = [
        ("coop_emulated_matmul", coop_emulated_matmul),
        ("coop_emulated_attention", coop_emulated_attention),
    ];
    for (name, check) in coop {
        let start = Instant::now();
        check(size);
        eprintln!(
            "subgroups of {size}: {name} checked in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// The adapter's subgroup size; with [`EXPECT_VAR`] set, checks that it is that size, as the
/// adapter reports it and as a shader sees it. Also returns how many lanes of a subgroup the
/// driver really runs (llvmpipe in Mesa 22 runs 16 from 32 up).
fn check_subgroup_size() -> (u32, u32) {
    let (lo, hi) = gpu().subgroup_sizes;
    let seen = probe_subgroups();
    let builtin = seen.iter().map(|s| s[0]).max().unwrap();
    let filled = seen.iter().map(|s| s[1]).max().unwrap();
    let count = seen[0][2];
    eprintln!(
        "subgroups: adapter reports {lo}..{hi}; a shader sees subgroup_size {builtin}, at most \
         {filled} active lanes, {count} subgroups in a workgroup of {PROBE_THREADS}"
    );
    assert!(
        (lo..=hi).contains(&builtin),
        "subgroup_size {builtin} outside {lo}..{hi}"
    );
    assert!(
        filled <= builtin,
        "{filled} active lanes in subgroups of {builtin}"
    );
    match std::env::var(EXPECT_VAR) {
        Ok(v) => {
            let want: u32 = v.parse().expect("subgroup size");
            assert_eq!((lo, hi), (want, want), "subgroup sizes the adapter reports");
            assert_eq!(builtin, want, "subgroup_size a shader sees");
        }
        Err(_) => eprintln!("{EXPECT_VAR} unset: the adapter's own size is not checked"),
    }
    (hi, filled)
}

const PROBE_THREADS: u32 = 256;

/// Per invocation of one workgroup: (subgroup_size, subgroupAdd(1), num_subgroups).
fn probe_subgroups() -> Vec<[u32; 3]> {
    let g = gpu();
    let source = format!(
        "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
         @compute @workgroup_size({PROBE_THREADS})\n\
         fn main(@builtin(local_invocation_index) i: u32, @builtin(subgroup_size) size: u32,\n\
                 @builtin(num_subgroups) count: u32) {{\n\
             let lanes = subgroupAdd(1u);\n\
             out[3u * i] = size;\n\
             out[3u * i + 1u] = lanes;\n\
             out[3u * i + 2u] = count;\n\
         }}\n"
    );
    let module = g.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("subgroup probe"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = g
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("subgroup probe"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
    let t = g
        .zeros("probe", &[3 * PROBE_THREADS as usize], DType::U32)
        .unwrap();
    let bind_group = g.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("subgroup probe"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &t.buffer,
                offset: t.offset,
                size: wgpu::BufferSize::new(4 * 3 * PROBE_THREADS as u64),
            }),
        }],
    });
    let mut encoder = g.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    g.queue.submit([encoder.finish()]);
    let v = g.read_u32(&t).unwrap();
    v.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
}

/// (rows N, channels C) for the 256-thread row kernels: C of one, below a subgroup, between
/// subgroup and workgroup, and longer than the workgroup (each thread takes several).
const LN_SHAPES: [(usize, usize); 5] = [(1, 1), (5, 3), (33, 37), (3, 300), (7, 771)];

/// Random activations with a non-zero mean per row, so the mean subtraction matters.
fn activations(seed: u64, n: usize, c: usize) -> Vec<f32> {
    let mut x = rng(seed).vec_normal(n * c, 1.5);
    for (i, v) in x.iter_mut().enumerate() {
        *v += ((i / c) % 7) as f32 * 0.5 - 1.0;
    }
    x
}

fn f32_input(label: &str, data: &[f32], shape: &[usize]) -> Tensor {
    upload(label, data, shape, DType::F32).0
}

fn cpu_layernorm(x: &[f32], w: &[f32], b: &[f32], n: usize, c: usize) -> [Vec<f32>; 3] {
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c);
    [out, mean, rstd]
}

fn layernorm_forward(size: u32) {
    for (s, &(n, c)) in LN_SHAPES.iter().enumerate() {
        let x = activations(10 + s as u64, n, c);
        let w = rng(20 + s as u64).vec_uniform(c, 0.5, 1.5);
        let b = rng(30 + s as u64).vec_uniform(c, -0.5, 0.5);
        let out = poisoned("out", &[n, c], DType::F32);
        let mean = poisoned("mean", &[n], DType::F32);
        let rstd = poisoned("rstd", &[n], DType::F32);
        let (xt, wt, bt) = (
            f32_input("inp", &x, &[n, c]),
            f32_input("weight", &w, &[c]),
            f32_input("bias", &b, &[c]),
        );
        let d = ln::layernorm_forward(gpu(), &out, &mean, &rstd, &xt, &wt, &bt).unwrap();
        if s == 0 {
            assert_reduction_variant(&d);
        }
        gpu().run(&[&d]).unwrap();
        let want = cpu_layernorm(&x, &w, &b, n, c);
        let what = format!("subgroups of {size}: layernorm_forward N={n} C={c}");
        for (name, t, want) in [
            ("out", &out, &want[0]),
            ("mean", &mean, &want[1]),
            ("rstd", &rstd, &want[2]),
        ] {
            assert_close(&format!("{what} {name}"), &read(t), want, 1e-5);
        }
    }
}

fn fused_residual_layernorm_forward(size: u32) {
    for (s, &(n, c)) in LN_SHAPES.iter().enumerate() {
        let a = activations(40 + s as u64, n, c);
        let b = rng(50 + s as u64).vec_normal(n * c, 1.0);
        let w = rng(60 + s as u64).vec_uniform(c, 0.5, 1.5);
        let bias = rng(70 + s as u64).vec_uniform(c, -0.5, 0.5);
        let residual = poisoned("residual", &[n, c], DType::F32);
        let out = poisoned("out", &[n, c], DType::F32);
        let mean = poisoned("mean", &[n], DType::F32);
        let rstd = poisoned("rstd", &[n], DType::F32);
        let d = ln::fused_residual_layernorm_forward(
            gpu(),
            &ln::FusedResidualLayerNorm {
                residual_out: &residual,
                out: &out,
                mean: &mean,
                rstd: &rstd,
                a: &f32_input("a", &a, &[n, c]),
                b: &f32_input("b", &b, &[n, c]),
                weight: &f32_input("weight", &w, &[c]),
                bias: &f32_input("bias", &bias, &[c]),
            },
        )
        .unwrap();
        if s == 0 {
            assert_reduction_variant(&d);
        }
        gpu().run(&[&d]).unwrap();
        let mut sum = vec![0.0; n * c];
        cpu::elementwise::residual_forward(&mut sum, &a, &b);
        let want = cpu_layernorm(&sum, &w, &bias, n, c);
        let what = format!("subgroups of {size}: fused_residual_layernorm N={n} C={c}");
        assert_close(&format!("{what} residual"), &read(&residual), &sum, 1e-6);
        assert_close(&format!("{what} out"), &read(&out), &want[0], 1e-5);
        assert_close(&format!("{what} mean"), &read(&mean), &want[1], 1e-5);
        assert_close(&format!("{what} rstd"), &read(&rstd), &want[2], 1e-5);
    }
}

fn layernorm_backward(size: u32) {
    for (s, &(n, c)) in LN_SHAPES.iter().chain(&[(50, 64)]).enumerate() {
        let seed = 80 + 10 * s as u64;
        let x = activations(seed, n, c);
        let w = rng(seed + 1).vec_uniform(c, 0.5, 1.5);
        let b = rng(seed + 2).vec_uniform(c, -0.5, 0.5);
        let dout = rng(seed + 3).vec_normal(n * c, 1.0);
        let [_, mean, rstd] = cpu_layernorm(&x, &w, &b, n, c);
        // Accumulating outputs start from arbitrary values.
        let mut r = rng(seed + 4);
        let mut want = [
            r.vec_uniform(n * c, -1.0, 1.0),
            r.vec_uniform(c, -1.0, 1.0),
            r.vec_uniform(c, -1.0, 1.0),
        ];
        let dinp = f32_input("dinp", &want[0], &[n, c]);
        let dweight = f32_input("dweight", &want[1], &[c]);
        let dbias = f32_input("dbias", &want[2], &[c]);
        let scratch = poisoned(
            "scratch",
            &[ln::layernorm_backward_scratch_len(n, c)],
            DType::F32,
        );
        let ds = ln::layernorm_backward(
            gpu(),
            &ln::LayerNormBackward {
                dinp: &dinp,
                dweight: &dweight,
                dbias: &dbias,
                scratch: &scratch,
                dout: &f32_input("dout", &dout, &[n, c]),
                inp: &f32_input("inp", &x, &[n, c]),
                weight: &f32_input("weight", &w, &[c]),
                mean: &f32_input("mean", &mean, &[n]),
                rstd: &f32_input("rstd", &rstd, &[n]),
            },
        )
        .unwrap();
        if s == 0 {
            assert_reduction_variant(&ds[0]);
        }
        gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
        let [want_dinp, want_dweight, want_dbias] = &mut want;
        cpu::layernorm::layernorm_backward(
            want_dinp,
            want_dweight,
            want_dbias,
            &dout,
            &x,
            &w,
            &mean,
            &rstd,
            c,
        );
        let what = format!("subgroups of {size}: layernorm_backward N={n} C={c}");
        for (name, t, want) in [
            ("dinp", &dinp, &want[0]),
            ("dweight", &dweight, &want[1]),
            ("dbias", &dbias, &want[2]),
        ] {
            assert_close(&format!("{what} {name}"), &read(t), want, 1e-5);
        }
    }
}

/// (rows N, real vocabulary V, padded columns Vp): rows shorter than a subgroup, than the
/// 256-thread workgroup, and longer than it, up to GPT-2's vocabulary.
const CE_SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (5, 7, 9),
    (6, 37, 40),
    (33, 100, 128),
    (7, 1000, 1003),
    (3, 50257, 50304),
];

fn crossentropy(size: u32) {
    for backward in [true, false] {
        for (s, &(n, v, vp)) in CE_SHAPES.iter().enumerate() {
            let mut r = rng(200 + s as u64);
            // The padded columns hold values that would dominate the softmax were they not
            // masked out.
            let mut logits = r.vec_normal(n * vp, 3.0);
            for i in 0..n {
                for j in v..vp {
                    logits[i * vp + j] = 50.0 + j as f32 * 1e-3;
                }
            }
            let targets: Vec<u32> = (0..n)
                .map(|i| match i {
                    0 => v as u32 - 1,
                    1 => 0,
                    _ => r.below(v as u64) as u32,
                })
                .collect();
            let lt = f32_input("logits", &logits, &[n, vp]);
            let tt = gpu().upload_u32("targets", &targets, &[n]).unwrap();
            let dloss = 0.37f32;
            let losses = poisoned("losses", &[n], DType::F32);
            let d = ce::crossentropy_forward_backward(
                gpu(),
                &losses,
                &lt,
                &tt,
                &f32_input("dloss", &[dloss], &[1]),
                v,
                backward,
            )
            .unwrap();
            if s == 0 {
                assert_reduction_variant(&d);
            }
            gpu().run(&[&d]).unwrap();
            let what = format!(
                "subgroups of {size}: crossentropy backward={backward} N={n} V={v} Vp={vp}"
            );
            let mut want = vec![0.0; n];
            cpu::crossentropy::crossentropy_forward(&mut want, &logits, &targets, vp, v);
            assert_close(&format!("{what} losses"), &read(&losses), &want, 1e-5);
            let got = read(&lt);
            if backward {
                let mut want = vec![0.0; n * vp];
                cpu::crossentropy::crossentropy_backward(
                    &mut want, &logits, &targets, dloss, vp, v,
                );
                assert_close(&format!("{what} dlogits"), &got, &want, 1e-5);
                assert!(
                    (0..n).all(|i| (v..vp).all(|j| got[i * vp + j].to_bits() == 0)),
                    "{what}: padded columns must get exactly +0 gradient"
                );
            } else {
                assert_bitwise_eq(&format!("{what}: logits untouched"), &got, &logits);
            }
        }
    }
}

fn loss_mean(size: u32) {
    for (s, &n) in [1usize, 5, 255, 257, 16_387].iter().enumerate() {
        let losses = rng(300 + s as u64).vec_uniform(n, 0.0, 11.0);
        let scale = 1.0 / (n as f32 * 3.0);
        let out = poisoned("out", &[1], DType::F32);
        let d = ce::loss_mean(
            gpu(),
            &out,
            &f32_input("losses", &losses, &[n]),
            scale,
            false,
        )
        .unwrap();
        if s == 0 {
            assert_reduction_variant(&d);
        }
        gpu().run(&[&d]).unwrap();
        assert_close(
            &format!("subgroups of {size}: loss_mean N={n}"),
            &read(&out),
            &[cpu::crossentropy::loss_mean(&losses, scale)],
            1e-5,
        );
    }
}

fn grad_norm(size: u32) {
    // (gradients per buffer, first-stage workgroups): one thread's worth, part of a subgroup,
    // around the workgroup, grid-stride loops over many workgroups and over one, and several
    // buffers (more partials for the finishing pass).
    let cases: [(&[usize], usize); 7] = [
        (&[1], opt::GRAD_NORM_MAX_GROUPS),
        (&[5], opt::GRAD_NORM_MAX_GROUPS),
        (&[255], opt::GRAD_NORM_MAX_GROUPS),
        (&[257], opt::GRAD_NORM_MAX_GROUPS),
        (&[70_001], opt::GRAD_NORM_MAX_GROUPS),
        (&[70_001], 3),
        (&[3, 1000, 40_000], 7),
    ];
    for (s, &(lens, groups)) in cases.iter().enumerate() {
        let loss_scale = 1024.0f32;
        let all: Vec<f32> = rng(400 + s as u64)
            .vec_normal(lens.iter().sum(), 0.01)
            .iter()
            .map(|g| g * loss_scale)
            .collect();
        let mut rest = &all[..];
        let buffers: Vec<Tensor> = lens
            .iter()
            .map(|&len| {
                let (head, tail) = rest.split_at(len);
                rest = tail;
                f32_input("grads", head, &[len])
            })
            .collect();
        let status = poisoned("status", &[opt::STATUS_LEN], DType::F32);
        let scratch = poisoned("scratch", &[opt::grad_norm_scratch_len(lens)], DType::F32);
        let scalars = gpu()
            .zeros("scalars", &[GradNormScalars::LEN], DType::F32)
            .unwrap();
        let max_norm = 0.05;
        GradNormScalars::new(1.0 / loss_scale, max_norm)
            .write(gpu(), &scalars)
            .unwrap();
        let grads: Vec<&Tensor> = buffers.iter().collect();
        let ds =
            opt::grad_norm_with_groups(gpu(), &status, &grads, &scratch, &scalars, groups).unwrap();
        if s == 0 {
            for d in &ds {
                assert_reduction_variant(d);
            }
        }
        gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
        let got = read(&status);
        let want = cpu::optimizer::grad_norm(&all, 1.0 / loss_scale, max_norm);
        let what = format!("subgroups of {size}: grad_norm over {lens:?} in {groups} workgroups");
        assert!(want.finite);
        check_status(&what, &got, &want);
    }
}

/// (M, K, N): below one 16x16 fragment, and several fragments with ragged edges.
const MM_SHAPES: [(usize, usize, usize); 2] = [(13, 9, 7), (37, 29, 53)];

/// The emulated cooperative-matrix kernel on its smallest tile (a workgroup of four subgroups,
/// sized for the adapter's largest subgroup): the forward product with a bias, f16 operands and
/// f32 output, within f32 rounding (products of f16 values are exact in f32) as the kernel's
/// tests hold it. Only the forward: llvmpipe takes from 30 s to over a minute to compile each
/// specialisation of this kernel, and the part that depends on the subgroup size (warps from
/// subgroup ids, each fragment spread over the lanes, staging and epilogue loads per thread) is
/// the same in the backward products, which tests/matmul_coop.rs checks on every tile at the
/// driver's default size.
fn coop_emulated_matmul(size: u32) {
    let tile = COOP_TILES[COOP_TILES.len() - 1];
    let kernel = MatmulKernel::CoopEmulated(tile);
    let input = |label: &str, seed: u64, shape: &[usize], dtype: DType| {
        let n = shape.iter().product();
        upload(label, &rng(seed).vec_uniform(n, -1.0, 1.0), shape, dtype)
    };
    for (i, &(m, k, n)) in MM_SHAPES.iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let (x, xv) = input("inp", seed, &[m, k], DType::F16);
        let (w, wv) = input("weight", seed + 1, &[n, k], DType::F16);
        let (bias, biasv) = input("bias", seed + 2, &[n], DType::F32);
        let out = poisoned("out", &[m, n], DType::F32);
        let opts = MatmulForward {
            bias: Some(&bias),
            kernel: Some(kernel),
            ..Default::default()
        };
        let what = format!("subgroups of {size}: {kernel} forward ({m}, {k}, {n})");
        let d = mm::matmul_forward(gpu(), &out, &x, &w, &opts);
        if size < 8 {
            // Written for 8 to 128 lanes: a fragment's 256 elements spread evenly over them.
            let e = d.err().expect("subgroups below 8 refused").to_string();
            assert!(e.contains("8 to 128"), "{e}");
            eprintln!("{what}: refused, as it should be: {e}");
            return;
        }
        gpu().run(&[&d.unwrap()]).unwrap();
        let mut want = vec![0.0; m * n];
        cpu::matmul::matmul_forward(&mut want, &xv, &wv, Some(&biasv), m, k, n);
        assert_close(&what, &read(&out), &want, F32_TOL);
    }
}

/// The emulated cooperative-matrix attention (forward and backward) on a tile of two warps, head
/// size 16, T = 37 across several blocks, f16 qkv: out, lse and dqkv against the float64
/// reference at the bounds of tests/attention.rs. Its subgroup-dependent parts (warps from
/// subgroup ids, fragments spread over the lanes, one lane per row of the softmax) at this size.
fn coop_emulated_attention(size: u32) {
    let (b, t, c, nh) = (1, 37, 32, 2);
    let cfg = attn::CoopAttention {
        warps: 2,
        bn: 16,
        emulate: true,
    };
    let input = |label: &str, seed: u64, shape: &[usize]| {
        let n = shape.iter().product();
        upload(label, &rng(seed).vec_normal(n, 1.5), shape, DType::F16)
    };
    let (qkv, qkv_v) = input("qkv", 700, &[b, t, 3 * c]);
    let (dout, dout_v) = input("dout", 701, &[b, t, c]);
    let out = poisoned("out", &[b, t, c], DType::F16);
    let lse = poisoned("lse", &[b, nh, t], DType::F32);
    let dqkv = poisoned("dqkv", &[b, t, 3 * c], DType::F32);
    let dd = poisoned("d", &[b, nh, t], DType::F32);
    let what = format!("subgroups of {size}: {cfg:?}");
    let forward = attn::coop_attention_forward(
        gpu(),
        cfg,
        &attn::AttentionForward {
            out: &out,
            lse: &lse,
            qkv: &qkv,
            b,
            t,
            nh,
        },
    );
    if size < 8 {
        let e = forward
            .err()
            .expect("subgroups below 8 refused")
            .to_string();
        assert!(e.contains("8 to 128"), "{e}");
        eprintln!("{what}: refused, as it should be: {e}");
        return;
    }
    let mut d = forward.unwrap();
    d.extend(
        attn::coop_attention_backward(
            gpu(),
            cfg,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &dout,
                qkv: &qkv,
                out: &out,
                lse: &lse,
                d_scratch: &dd,
                b,
                t,
                nh,
            },
        )
        .unwrap(),
    );
    gpu().run(&d.iter().collect::<Vec<_>>()).unwrap();
    let want = cpu::attention::attention_forward(&qkv_v, b, t, c, nh);
    let want_dqkv = cpu::attention::attention_backward(&dout_v, &qkv_v, b, t, c, nh);
    let out_want = round_to(&want.out, DType::F16);
    assert_close(&format!("{what} out"), &read(&out), &out_want, 2e-3);
    assert_close(&format!("{what} lse"), &read(&lse), &want.lse, 1e-4);
    assert_close(&format!("{what} dqkv"), &read(&dqkv), &want_dqkv, 3e-3);
}
