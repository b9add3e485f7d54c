//! Every WGSL file, in every specialisation the launchers use, parsed and validated by naga, so a
//! shader error fails here with its file and line; and every entry point a launcher names is in
//! the module.

use wgpt::gpu::shader::{preprocess, SHADERS};
use wgpt::ops::shader_variants;

#[test]
fn every_shader_variant_validates() {
    let variants = shader_variants();
    let mut failures = Vec::new();
    for file in SHADERS {
        let mine: Vec<_> = variants.iter().filter(|v| v.shader == file.name).collect();
        assert!(
            !mine.is_empty(),
            "shaders/{}.wgsl is used by no launcher",
            file.name
        );
        for v in mine {
            let path = format!("shaders/{}.wgsl", file.name);
            let text = match preprocess(file.name, file.source, &v.defines) {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            let module = match naga::front::wgsl::parse_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!(
                        "{:?}\n{}",
                        v.defines,
                        e.emit_to_string_with_path(&text, &path)
                    ));
                    continue;
                }
            };
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            );
            if let Err(e) = validator.validate(&module) {
                failures.push(format!(
                    "{:?}\n{}",
                    v.defines,
                    e.emit_to_string_with_path(&text, &path)
                ));
            }
            for entry in &v.entries {
                if !module.entry_points.iter().any(|e| e.name == *entry) {
                    failures.push(format!("{path} {:?}: no entry point {entry}", v.defines));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} shader variant(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
