//! Our checkpoint loader on arbitrary bytes: it must return Ok or an error, never panic, hang or
//! allocate far more than the input's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use wgpt::checkpoint::{hf, Checkpoint};
use wgpt::model::ParamLayout;

fuzz_target!(|data: &[u8]| {
    let _ = hf::is_own_checkpoint_bytes(data);
    if let Ok(c) = Checkpoint::from_bytes(Path::new("fuzz.safetensors"), data) {
        let total = ParamLayout::new(&c.config).total;
        assert_eq!(c.params.len(), total);
        if let Some((m, v)) = &c.moments {
            assert_eq!((m.len(), v.len()), (total, total));
        }
    }
});
