//! Memory plans made without a device, for a GPU's limits (2 GiB per binding, 80 GiB of
//! memory) and WebGPU's defaults: the recipe's real batch for GPT-2 124M and GPT-2 XL, every
//! buffer within the binding limit, and refusals that say what to change.

use wgpt::gpu::AdapterLimits;
use wgpt::model::GptConfig;
use wgpt::train::plan::MemoryPlan;
use wgpt::train::settings::{AttentionKind, Precision, TrainSettings};

const GIB: u64 = 1 << 30;

/// An 80 GiB GPU whose bindings and buffers stop at 2 GiB (wgpu's cap on Vulkan).
fn gpu_limits() -> AdapterLimits {
    AdapterLimits {
        adapter: "a GPU with 2 GiB bindings and 80 GiB".into(),
        max_binding: 2 * GIB,
        max_buffer: 2 * GIB,
        alignment: 256,
        memory: Some(80 * GIB),
    }
}

fn settings(config: GptConfig, b: usize, t: usize, precision: Precision) -> TrainSettings {
    let mut s = TrainSettings::new(config, b, t);
    s.precision = precision;
    s
}

/// Every buffer the plan allocates is within one binding.
fn check_bindings(what: &str, plan: &MemoryPlan, limits: &AdapterLimits) {
    let max = limits.max_binding.min(limits.max_buffer);
    for (k, b) in plan.storage.buffers.iter().enumerate() {
        assert!(
            (b.len * 4) as u64 <= max,
            "{what}: storage buffer {k} is {} bytes",
            b.len * 4
        );
    }
    for (name, bytes) in &plan.activations.buffers {
        assert!(
            *bytes <= max,
            "{what}: activation buffer ({name}) is {bytes} bytes"
        );
    }
    assert!(plan.classifier_bytes <= max, "{what}: logits chunk");
    assert!(
        plan.total() <= limits.memory.unwrap_or(u64::MAX),
        "{what}: total"
    );
    eprintln!(
        "{what}: {} | {} | {} storage buffers, wte in {} pieces",
        plan.line(),
        plan.classifier_line(50304),
        plan.storage.buffers.len(),
        plan.storage.pieces.wte.len()
    );
}

#[test]
fn the_recipes_batch_fits_a_gpu() {
    let limits = gpu_limits();
    // The default run: B=16, one chunk of logits.
    let s = settings(GptConfig::gpt2(), 16, 1024, Precision::F16);
    let plan = MemoryPlan::new(&s, &limits).unwrap();
    check_bindings("gpt2 124M B=16 T=1024 f16", &plan, &limits);
    assert_eq!(plan.chunks, 1);
    for precision in [Precision::F16, Precision::F32] {
        let s = settings(GptConfig::gpt2(), 64, 1024, precision);
        let plan = MemoryPlan::new(&s, &limits).unwrap();
        check_bindings(
            &format!("gpt2 124M B=64 T=1024 {precision}"),
            &plan,
            &limits,
        );
        // 64 x 1024 rows of 50304 logits are 6 GiB in f16: they come in chunks.
        assert!(plan.chunks >= 4, "{} chunks", plan.chunks);
        assert_eq!(plan.storage.buffers.len(), 1);
        assert_eq!(plan.storage.pieces.wte.len(), 1);
    }
    let s = settings(GptConfig::gpt2_xl(), 16, 1024, Precision::F16);
    let plan = MemoryPlan::new(&s, &limits).unwrap();
    check_bindings("gpt2-xl B=16 T=1024 f16", &plan, &limits);
    // 1.56B parameters: 6.2 GB in f32, over buffers of at most 2 GiB.
    assert!(plan.storage.buffers.len() >= 3);
    let n: usize = plan
        .storage
        .pieces
        .iter()
        .flat_map(|(_, ps)| ps.iter().map(|p| p.len()))
        .sum();
    assert_eq!(
        n, 1_557_686_400,
        "GPT-2 XL with the vocabulary padded to 50304"
    );
}

#[test]
fn gpt2_sizes_on_webgpu_default_limits() {
    // 128 MiB per binding, 256 MiB per buffer, the machine's 24 GiB.
    let limits = AdapterLimits::webgpu_default(Some(24 * GIB));
    for (name, config) in [
        ("gpt2", GptConfig::gpt2()),
        ("gpt2-medium", GptConfig::gpt2_medium()),
        ("gpt2-large", GptConfig::gpt2_large()),
    ] {
        let s = settings(config, 4, 64, Precision::F16);
        let plan = MemoryPlan::new(&s, &limits).unwrap();
        check_bindings(
            &format!("{name} B=4 T=64 f16, WebGPU defaults"),
            &plan,
            &limits,
        );
        assert!(plan.storage.pieces.wte.len() >= 2, "{name}: wte is split");
    }
}

#[test]
fn what_cannot_fit_is_refused_with_what_to_change() {
    let limits = gpu_limits();
    // GPT-2 XL at B=64 T=1024 needs far more than 80 GiB of activations.
    let s = settings(GptConfig::gpt2_xl(), 64, 1024, Precision::F16);
    let e = MemoryPlan::new(&s, &limits).unwrap_err().to_string();
    assert!(
        e.contains("device memory") && e.contains("--grad-accum"),
        "{e}"
    );
    // Naive attention keeps B x heads x T x T scores: 16 x 12 x 1024 x 1024 f32 is 768 MiB, fine;
    // at B=64, 3 GiB, more than a binding.
    let mut s = settings(GptConfig::gpt2(), 64, 1024, Precision::F16);
    s.attention = AttentionKind::Naive;
    let e = MemoryPlan::new(&s, &limits).unwrap_err().to_string();
    assert!(
        e.contains("attention probs") && e.contains("--attention flash"),
        "{e}"
    );
    // A matmul weight larger than one binding (c_fc: 4 x 12288 x 12288 f32, 2.25 GiB) cannot
    // be split.
    let wide = GptConfig {
        n_embd: 12288,
        n_head: 96,
        ..GptConfig::gpt2()
    };
    let s = settings(wide, 1, 64, Precision::F16);
    let e = MemoryPlan::new(&s, &limits).unwrap_err().to_string();
    assert!(
        e.contains("mlp.c_fc.weight") && e.contains("cannot be split"),
        "{e}"
    );
}

#[test]
fn a_model_too_large_for_memory_is_told_to_shrink() {
    // 200 layers 2048 wide: 10B parameters, 190 GB with gradients and moments.
    let wide = GptConfig {
        n_layer: 200,
        n_embd: 2048,
        n_head: 16,
        ..GptConfig::gpt2()
    };
    let e = MemoryPlan::new(&settings(wide, 1, 64, Precision::F16), &gpu_limits())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("alone take") && e.contains("use a smaller model"),
        "{e}"
    );
    // The same plan laid out without the memory check, for --dry-run to print.
    let plan = MemoryPlan::layout(&settings(wide, 1, 64, Precision::F16), &gpu_limits()).unwrap();
    assert!(plan.total() > 80 * GIB);
}
