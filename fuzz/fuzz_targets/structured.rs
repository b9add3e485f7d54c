//! Structure-aware: builds well-formed safetensors files and configs from the fuzzer's bytes, so
//! both loaders see the hostile numbers (enormous or overflowing shapes, offsets and config
//! sizes, wrong dtypes, missing and extra tensors) that byte mutations of the seeds rarely reach
//! inside a JSON header.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use std::path::Path;
use wgpt::checkpoint::{hf, Checkpoint};
use wgpt::model::{GptConfig, ParamId, ParamLayout};

const DTYPES: [(&str, u64); 9] = [
    ("F32", 32),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U8", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F64", 64),
    ("BOOL", 8),
];

/// A number: mostly small, sometimes near a power of two, sometimes anything.
fn number(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0..=3)? {
        0 | 1 => u.int_in_range(0..=16)?,
        2 => {
            let k = u.int_in_range(0..=63)?;
            (1u64 << k).wrapping_add_signed(u.int_in_range::<i64>(-2..=2)?)
        }
        _ => u.arbitrary()?,
    })
}

struct Tensor {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    /// None: placed right after the previous tensor, sized by shape and dtype.
    offsets: Option<(u64, u64)>,
}

fn tensor(u: &mut Unstructured, names: &[String]) -> Result<Tensor> {
    let name = if !names.is_empty() && u.ratio(3, 4)? {
        u.choose(names)?.clone()
    } else {
        u.arbitrary()?
    };
    let (dtype, _) = if u.ratio(1, 2)? {
        DTYPES[0]
    } else {
        *u.choose(&DTYPES)?
    };
    let rank = u.int_in_range(0..=3)?;
    let shape = (0..rank).map(|_| number(u)).collect::<Result<_>>()?;
    let offsets = if u.ratio(1, 4)? {
        Some((number(u)?, number(u)?))
    } else {
        None
    };
    Ok(Tensor {
        name,
        dtype,
        shape,
        offsets,
    })
}

/// The tensors a complete file for `c` holds: ours (with moments) or Hugging Face's layout.
fn complete(c: &GptConfig, hf_layout: bool, moments: bool) -> Vec<Tensor> {
    let mut out = Vec::new();
    for (id, e) in ParamLayout::new(c).entries.iter() {
        let shape: Vec<u64> = if hf_layout && id == ParamId::Wte {
            vec![c.vocab_size as u64, c.n_embd as u64]
        } else if hf_layout && id.is_conv1d() {
            vec![e.shape[1] as u64, e.shape[0] as u64]
        } else {
            e.shape.iter().map(|&d| d as u64).collect()
        };
        let mut names = vec![id.name()];
        if moments && !hf_layout {
            names.push(format!("optim.m.{}", id.name()));
            names.push(format!("optim.v.{}", id.name()));
        }
        for name in names {
            out.push(Tensor {
                name,
                dtype: "F32",
                shape: shape.clone(),
                offsets: None,
            });
        }
    }
    out
}

fn safetensors_bytes(tensors: &[Tensor], metadata: Map<String, Value>) -> Vec<u8> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), Value::Object(metadata));
    let mut end = 0u64;
    for t in tensors {
        let bits = DTYPES.iter().find(|d| d.0 == t.dtype).map_or(32, |d| d.1);
        let (s, e) = t.offsets.unwrap_or_else(|| {
            let size = t
                .shape
                .iter()
                .try_fold(bits, |a, &d| a.checked_mul(d))
                .map_or(u64::MAX, |b| b / 8);
            (end, end.saturating_add(size))
        });
        end = e;
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [s, e]}),
        );
    }
    let header = Value::Object(header).to_string().into_bytes();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    // Data for the offsets when it is small; a short file otherwise.
    let data_len = if end <= 1 << 16 { end } else { end % 4096 };
    bytes.resize(bytes.len() + data_len as usize, 0);
    bytes
}

fn run(u: &mut Unstructured) -> Result<()> {
    let nums: Vec<u64> = (0..6).map(|_| number(u)).collect::<Result<_>>()?;
    let hf_layout = u.arbitrary()?;
    let config = GptConfig {
        n_layer: nums[0] as usize,
        n_head: nums[1] as usize,
        n_embd: nums[2] as usize,
        block_size: nums[3] as usize,
        vocab_size: nums[4] as usize,
        padded_vocab_size: if hf_layout {
            (nums[4] as usize).div_ceil(128).saturating_mul(128)
        } else {
            nums[5] as usize
        },
    };
    let small = nums.iter().all(|&n| n <= 64) && config.validate().is_ok();
    let moments = u.arbitrary()?;
    let mut tensors = if small && u.ratio(3, 4)? {
        complete(&config, hf_layout, moments)
    } else {
        Vec::new()
    };
    let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    // Edits: replace a tensor, drop one, or add one.
    for _ in 0..u.int_in_range(0..=16)? {
        let t = tensor(u, &names)?;
        match (
            u.int_in_range(0..=2)?,
            tensors.iter().position(|x| x.name == t.name),
        ) {
            (0, Some(i)) => tensors[i] = t,
            (1, Some(i)) => {
                tensors.remove(i);
            }
            _ => tensors.push(t),
        }
    }
    let mut metadata = Map::new();
    if hf_layout {
        metadata.insert("format".into(), "pt".into());
    } else {
        metadata.insert("format".into(), "wgpt-checkpoint".into());
        let config_json = json!({
            "n_layer": nums[0], "n_head": nums[1], "n_embd": nums[2],
            "block_size": nums[3], "vocab_size": nums[4], "padded_vocab_size": nums[5],
        });
        metadata.insert("config".into(), config_json.to_string().into());
        if u.arbitrary()? {
            for key in [
                "step",
                "adam_t",
                "loader_position",
                "loss_scale",
                "clean_steps",
            ] {
                metadata.insert(key.into(), number(u)?.to_string().into());
            }
            metadata.insert("rng_state".into(), "1,2,3,4".into());
            metadata.insert("settings".into(), "{}".into());
        }
    }
    let bytes = safetensors_bytes(&tensors, metadata);
    let path = Path::new("fuzz.safetensors");
    let _ = hf::is_own_checkpoint_bytes(&bytes);
    if let Ok(c) = Checkpoint::from_bytes(path, &bytes) {
        assert_eq!(c.params.len(), ParamLayout::new(&c.config).total);
    }
    let config_json = json!({
        "n_layer": nums[0], "n_head": nums[1], "n_embd": nums[2],
        "n_positions": nums[3], "vocab_size": nums[4],
    })
    .to_string();
    if let Ok(c) = hf::import_bytes(
        Path::new("config.json"),
        config_json.as_bytes(),
        path,
        &bytes,
    ) {
        assert_eq!(c.params.len(), ParamLayout::new(&c.config).total);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
