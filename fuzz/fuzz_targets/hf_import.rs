//! The Hugging Face import on arbitrary `config.json` and `model.safetensors` bytes. The input is
//! split as: 2 bytes little-endian length n, n bytes of config.json, then the safetensors file
//! (`wgpt`'s `fuzz_seeds` example writes seeds in this form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wgpt::checkpoint::hf;
use wgpt::model::ParamLayout;

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (config, model) = rest.split_at(usize::from(u16::from_le_bytes(*len)).min(rest.len()));
    if let Ok(c) = hf::import_bytes(
        Path::new("config.json"),
        config,
        Path::new("model.safetensors"),
        model,
    ) {
        assert_eq!(c.params.len(), ParamLayout::new(&c.config).total);
        assert!(c.moments.is_none() && c.state.is_none());
    }
});
