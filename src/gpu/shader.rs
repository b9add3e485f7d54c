//! WGSL sources, compiled into the binary, and the small text preprocessor that specialises them.
//!
//! A shader file may use
//! - `{{NAME}}`, replaced by the value of define `NAME` (an error if it is not defined);
//! - lines `#if NAME`, `#if !NAME`, `#else`, `#endif` (nestable): a define is true when it is
//!   present and its value is not `0` or `false`.
//!
//! When any define has the value `f16`, `enable f16;` is put in front of the source.

use crate::error::{Error, Result};

/// One shader file: its name (the file stem) and its text.
pub struct ShaderFile {
    pub name: &'static str,
    pub source: &'static str,
}

macro_rules! shader_files {
    ($($name:literal),* $(,)?) => {
        /// Every shader of the library, in `shaders/`.
        pub static SHADERS: &[ShaderFile] = &[
            $(ShaderFile { name: $name, source: include_str!(concat!("../../shaders/", $name, ".wgsl")) },)*
        ];
    };
}

shader_files!(
    "elementwise",
    "matmul",
    "matmul_coop",
    "layernorm",
    "attention_naive",
    "attention_flash",
    "crossentropy",
    "embedding",
    "optimizer",
    "sample",
);

/// The source of a shader file by name.
pub fn source(name: &str) -> Result<&'static str> {
    SHADERS
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.source)
        .ok_or_else(|| Error::Other(format!("no shader named '{name}' in shaders/")))
}

fn is_true(defines: &[(String, String)], name: &str) -> bool {
    defines
        .iter()
        .find(|(k, _)| k == name)
        .is_some_and(|(_, v)| v != "0" && v != "false")
}

/// Specialises `text` (the file `name`) with `defines`.
pub fn preprocess(name: &str, text: &str, defines: &[(String, String)]) -> Result<String> {
    let err = |line: usize, msg: String| Error::Other(format!("shaders/{name}.wgsl:{line}: {msg}"));
    let mut out = String::with_capacity(text.len() + 64);
    if defines.iter().any(|(_, v)| v == "f16") {
        out.push_str("enable f16;\n");
    }
    // Stack of (this branch active, some branch of this #if already taken).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let active = |stack: &Vec<(bool, bool)>| stack.iter().all(|&(a, _)| a);
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let trimmed = line.trim_start();
        if let Some(cond) = trimmed.strip_prefix("#if ") {
            let cond = cond.trim();
            let value = match cond.strip_prefix('!') {
                Some(n) => !is_true(defines, n.trim()),
                None => is_true(defines, cond),
            };
            stack.push((value, value));
            out.push('\n');
            continue;
        }
        if trimmed.starts_with("#else") {
            let top = stack
                .last_mut()
                .ok_or_else(|| err(lineno, "#else without #if".into()))?;
            top.0 = !top.1;
            top.1 = true;
            out.push('\n');
            continue;
        }
        if trimmed.starts_with("#endif") {
            stack
                .pop()
                .ok_or_else(|| err(lineno, "#endif without #if".into()))?;
            out.push('\n');
            continue;
        }
        if !active(&stack) {
            // Keep line numbers equal to the file's so naga's messages point at the right line.
            out.push('\n');
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| err(lineno, "unclosed {{".into()))?;
            let key = after[..end].trim();
            let value = defines
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| err(lineno, format!("define '{key}' is not set")))?;
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    if !stack.is_empty() {
        return Err(err(text.lines().count(), "#if without #endif".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn substitutes_and_selects_branches() {
        let src = "a {{T}} b\n#if X\nx\n#if !Y\nnoty\n#else\ny\n#endif\n#else\nnotx\n#endif\nend";
        let out = preprocess("t", src, &d(&[("T", "f16"), ("X", "1"), ("Y", "0")])).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines, ["enable f16;", "a f16 b", "x", "noty", "end"]);
        let out = preprocess("t", src, &d(&[("T", "f32"), ("Y", "1")])).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines, ["a f32 b", "notx", "end"]);
    }

    #[test]
    fn keeps_line_numbers() {
        let src = "l1\n#if X\nl3\n#endif\nl5";
        let out = preprocess("t", src, &[]).unwrap();
        assert_eq!(out.lines().nth(4), Some("l5"));
    }

    #[test]
    fn reports_missing_define_with_line() {
        let e = preprocess("t", "ok\n{{NOPE}}", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("shaders/t.wgsl:2") && e.contains("NOPE"), "{e}");
        assert!(preprocess("t", "#if X\n", &[]).is_err());
        assert!(preprocess("t", "#endif\n", &[]).is_err());
    }
}
