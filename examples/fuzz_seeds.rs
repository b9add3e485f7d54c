//! Writes the fuzzers' seed inputs: tiny files made by our own writers (a checkpoint with and
//! without optimiser state, a Hugging Face export), plus the export re-encoded as f16 and as
//! bf16 with `transformer.`-prefixed keys, the other forms the importer accepts.
//!
//!     cargo run --example fuzz_seeds -- fuzz/seeds
//!
//! Seeds for `hf_import` are `[config.json length: u16 LE][config.json][model.safetensors]`.

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wgpt::checkpoint::{hf, Checkpoint, TrainState};
use wgpt::model::init::init_params;
use wgpt::model::{GptConfig, ParamLayout};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn tiny() -> GptConfig {
    GptConfig {
        n_layer: 1,
        n_head: 1,
        n_embd: 2,
        block_size: 2,
        vocab_size: 3,
        padded_vocab_size: 4,
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

fn hf_seed(config_json: &[u8], model: &[u8]) -> Result<Vec<u8>> {
    let len = u16::try_from(config_json.len()).map_err(|_| "config.json over 64 KiB")?;
    let mut seed = len.to_le_bytes().to_vec();
    seed.extend_from_slice(config_json);
    seed.extend_from_slice(model);
    Ok(seed)
}

/// `model` with every tensor converted to f16 or bf16 and its key given `prefix`.
fn reencode(model: &[u8], dtype: Dtype, prefix: &str) -> Result<Vec<u8>> {
    let st = SafeTensors::deserialize(model)?;
    let mut converted = Vec::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        let bytes: Vec<u8> = match dtype {
            Dtype::F16 => values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            _ => values
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        converted.push((format!("{prefix}{name}"), view.shape().to_vec(), bytes));
    }
    let views = converted
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(dtype, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let md = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(md))?)
}

fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    let scratch = std::env::temp_dir().join(format!("wgpt-fuzz-seeds-{}", std::process::id()));
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg);
    let params = init_params(&cfg, &layout, 1);

    let dir = out.join("checkpoint");
    std::fs::create_dir_all(&dir)?;
    let full = Checkpoint {
        config: cfg,
        params: params.clone(),
        moments: Some((vec![0.5; layout.total], vec![0.25; layout.total])),
        state: Some(TrainState {
            step: 3,
            adam_t: 3,
            loader_position: 96,
            loader_epoch: 0,
            rng_state: [1, 2, 3, 4],
            loss_scale: 1.0,
            clean_steps: 3,
            settings: "{\"batch\":1}".into(),
        }),
    };
    let weights_only = Checkpoint {
        moments: None,
        state: None,
        ..full.clone()
    };
    for (name, c) in [("full", &full), ("weights_only", &weights_only)] {
        let path = scratch.join(format!("{name}.safetensors"));
        c.save(&path)?;
        write(
            &dir.join(format!("{name}.safetensors")),
            &std::fs::read(&path)?,
        )?;
    }

    let dir = out.join("hf_import");
    std::fs::create_dir_all(&dir)?;
    let export = scratch.join("hf");
    hf::export(&export, &cfg, &params)?;
    let config_json = std::fs::read(export.join("config.json"))?;
    let model = std::fs::read(export.join("model.safetensors"))?;
    write(&dir.join("f32"), &hf_seed(&config_json, &model)?)?;
    let f16 = reencode(&model, Dtype::F16, "")?;
    write(&dir.join("f16"), &hf_seed(&config_json, &f16)?)?;
    let bf16 = reencode(&model, Dtype::BF16, "transformer.")?;
    write(&dir.join("bf16_prefixed"), &hf_seed(&config_json, &bf16)?)?;

    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
