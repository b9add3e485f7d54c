//! Hugging Face GPT-2 (`model.safetensors` + `config.json`) import and export.
//!
//! Keys as in openai-community/gpt2, optionally prefixed with `transformer.`; the four Conv1D
//! weights (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) are stored [in, out] there
//! and [out, in] here; there is no `lm_head.weight` (it is `wte`); `attn.bias` and
//! `attn.masked_bias` are causal-mask buffers, not parameters, and are skipped.

use super::{
    check_fits, check_tensor, elements_f32, parse, read_file, read_metadata,
    write_safetensors_atomic, Checkpoint,
};
use crate::error::{Error, Result};
use crate::model::config::pad_vocab;
use crate::model::{GptConfig, ParamId, ParamLayout};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the weights and the config of `path` are: a directory holding `model.safetensors` and
/// `config.json`, or the safetensors file itself (config.json beside it).
pub fn resolve(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let (file, dir) = if path.is_dir() {
        (path.join("model.safetensors"), path.to_path_buf())
    } else {
        let dir = path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from("."));
        (path.to_path_buf(), dir)
    };
    if !file.exists() {
        return Err(Error::io(
            &file,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found; --init-from takes a Hugging Face GPT-2 folder (model.safetensors + config.json), that file, or a checkpoint",
            ),
        ));
    }
    Ok((file, dir.join("config.json")))
}

/// Reads GPT-2's shape from a Hugging Face `config.json`.
pub fn read_config(path: &Path) -> Result<GptConfig> {
    parse_config(path, &read_file(path)?)
}

/// Parses GPT-2's shape from the bytes of a Hugging Face `config.json`; `path` only names the
/// file in errors.
pub fn parse_config(path: &Path, json: &[u8]) -> Result<GptConfig> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Error::format(path, format!("malformed JSON: {e}")))?;
    let get = |k: &str| -> Result<usize> {
        let x = v
            .get(k)
            .ok_or_else(|| Error::format(path, format!("config.json has no '{k}'")))?;
        x.as_u64()
            .filter(|&n| n > 0 && n < (1 << 31))
            .map(|n| n as usize)
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!("config.json '{k}' is not a positive integer: {x}"),
                )
            })
    };
    let vocab_size = get("vocab_size")?;
    let config = GptConfig {
        n_layer: get("n_layer")?,
        n_head: get("n_head")?,
        n_embd: get("n_embd")?,
        block_size: get("n_positions")?,
        vocab_size,
        padded_vocab_size: pad_vocab(vocab_size),
    };
    config
        .validate()
        .map_err(|e| Error::format(path, e.to_string()))?;
    Ok(config)
}

/// Whether safetensors bytes are one of our checkpoints (metadata `format` is ours).
pub fn is_own_checkpoint_bytes(bytes: &[u8]) -> bool {
    read_metadata(Path::new(""), bytes)
        .ok()
        .flatten()
        .and_then(|md| md.get("format").cloned())
        .is_some_and(|f| f == super::FORMAT)
}

/// Imports Hugging Face GPT-2 weights (gpt2, -medium, -large, -xl shapes; f32, f16 or bf16).
pub fn import(path: &Path) -> Result<Checkpoint> {
    let (file, config_path) = resolve(path)?;
    let config_json = read_file(&config_path)?;
    let bytes = read_file(&file)?;
    import_bytes(&config_path, &config_json, &file, &bytes)
}

/// Imports Hugging Face GPT-2 weights from the bytes of `config.json` and `model.safetensors`;
/// the paths only name the files in errors.
pub fn import_bytes(
    config_path: &Path,
    config_json: &[u8],
    file: &Path,
    bytes: &[u8],
) -> Result<Checkpoint> {
    let config = parse_config(config_path, config_json)?;
    let st = parse(file, bytes)?;
    check_fits(
        file,
        &config_path.display().to_string(),
        "config.json does not belong with this file, or the file is truncated",
        &config,
        config.vocab_size,
        bytes.len(),
    )?;
    let names = st.names();
    let prefixed = names.iter().any(|n| n.starts_with("transformer."));
    let layout = ParamLayout::new(&config);
    let c = config.n_embd;
    // Every tensor is found and checked before the buffer is allocated.
    let mut views = Vec::new();
    for (id, e) in layout.entries.iter() {
        let key = if prefixed {
            format!("transformer.{}", id.name())
        } else {
            id.name()
        };
        let view = st.tensor(&key).map_err(|_| {
            Error::format(
                file,
                format!("missing tensor '{key}' (the file does not match config.json's shape)"),
            )
        })?;
        let shape = if id == ParamId::Wte {
            vec![config.vocab_size, c]
        } else if id.is_conv1d() {
            vec![e.shape[1], e.shape[0]]
        } else {
            e.shape.clone()
        };
        check_tensor(file, &key, &view, &shape)?;
        views.push((e, view));
    }
    let mut params = vec![0f32; layout.total];
    for (e, view) in &views {
        let dst = &mut params[e.range()];
        let data = elements_f32(view);
        if e.id == ParamId::Wte {
            dst[..data.len()].copy_from_slice(&data);
        } else if e.id.is_conv1d() {
            let (out, inp) = (e.shape[0], e.shape[1]);
            for i in 0..inp {
                for o in 0..out {
                    dst[o * inp + i] = data[i * out + o];
                }
            }
        } else {
            dst.copy_from_slice(&data);
        }
    }
    Ok(Checkpoint {
        config,
        params,
        moments: None,
        state: None,
    })
}

/// Writes `model.safetensors` + `config.json` in the Hugging Face GPT-2 layout into `dir`:
/// Conv1D weights [in, out], no lm_head, padded vocabulary rows dropped, metadata format=pt.
pub fn export(dir: &Path, config: &GptConfig, params: &[f32]) -> Result<()> {
    let layout = ParamLayout::new(config);
    if params.len() != layout.total {
        return Err(Error::Other(format!(
            "export: {} parameters for a layout of {}",
            params.len(),
            layout.total
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = config.n_embd;
    let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (id, e) in layout.entries.iter() {
        let src = &params[e.range()];
        if id == ParamId::Wte {
            owned.push((
                id.name(),
                vec![config.vocab_size, c],
                src[..config.vocab_size * c].to_vec(),
            ));
        } else if id.is_conv1d() {
            let (out, inp) = (e.shape[0], e.shape[1]);
            let mut t = vec![0f32; out * inp];
            for o in 0..out {
                for i in 0..inp {
                    t[i * out + o] = src[o * inp + i];
                }
            }
            owned.push((id.name(), vec![inp, out], t));
        } else {
            owned.push((id.name(), e.shape.clone(), src.to_vec()));
        }
    }
    let tensors = owned
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    write_safetensors_atomic(&dir.join("model.safetensors"), tensors, md)?;
    let cfg = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_inner": null,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::Other(e.to_string()))?;
    let path = dir.join("config.json");
    let tmp = dir.join(".config.json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(())
}

/// Loads weights for `--init-from`: one of our checkpoints, or a Hugging Face GPT-2 folder/file.
pub fn load_any(path: &Path) -> Result<Checkpoint> {
    if path.is_file() {
        let bytes = read_file(path)?;
        // A file that is not valid safetensors is reported as such, whichever kind it was.
        let metadata = read_metadata(path, &bytes)?;
        if metadata
            .and_then(|md| md.get("format").cloned())
            .is_some_and(|f| f == super::FORMAT)
        {
            return Checkpoint::from_bytes(path, &bytes);
        }
        let (file, config_path) = resolve(path)?;
        if !config_path.exists() {
            return Err(Error::format(
                path,
                format!(
                    "not one of our checkpoints, and there is no {} beside it: a Hugging Face \
                     model.safetensors needs its model's config.json in the same folder",
                    config_path.display()
                ),
            ));
        }
        let config_json = read_file(&config_path)?;
        return import_bytes(&config_path, &config_json, &file, &bytes);
    }
    if path.is_dir() && !path.join("model.safetensors").exists() {
        // A checkpoint directory: take its newest checkpoint.
        let has_checkpoints = super::list_checkpoints(path).is_ok_and(|l| !l.is_empty());
        match super::load_newest(path) {
            Ok((_, c)) => return Ok(c),
            Err(e) if has_checkpoints => return Err(e),
            Err(_) => {}
        }
    }
    import(path)
}
