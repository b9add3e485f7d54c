//! WGSL sources, compiled into the binary, and the small text preprocessor that specialises them.
//!
//! A shader file may use
//! - `{{NAME}}`, replaced by the value of define `NAME` (an error if it is not defined);
//! - lines `#if NAME`, `#if !NAME`, `#else`, `#endif` (nestable): a define is true when it is
//!   present and its value is not `0` or `false`;
//! - a line `#include NAME`: the file `shaders/NAME.wgsl` of [`INCLUDES`] (shared functions) is
//!   appended after the text, once, so the including file's line numbers stay its own in naga's
//!   messages (WGSL module-scope declarations may come in any order).
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
    "matmul_rows",
    "layernorm",
    "attention_naive",
    "attention_flash",
    "attention_coop",
    "crossentropy",
    "embedding",
    "optimizer",
    "sample",
);

/// Files that shaders pull in with `#include NAME`: functions several kernels must compute
/// identically (the fused GELU epilogue of the matmuls and the GELU kernels, for one). They are
/// validated as part of each shader that includes them.
pub static INCLUDES: &[ShaderFile] = &[
    ShaderFile {
        name: "gelu",
        source: include_str!("../../shaders/gelu.wgsl"),
    },
    ShaderFile {
        name: "matmul_io",
        source: include_str!("../../shaders/matmul_io.wgsl"),
    },
];

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
    let mut out = String::with_capacity(text.len() + 64);
    if defines.iter().any(|(_, v)| v == "f16") {
        out.push_str("enable f16;\n");
    }
    let mut includes = Vec::new();
    expand(name, text, defines, &mut out, &mut includes)?;
    let mut done = 0;
    while done < includes.len() {
        let inc: String = includes[done].clone();
        let file = INCLUDES.iter().find(|f| f.name == inc).ok_or_else(|| {
            Error::Other(format!(
                "shaders/{name}.wgsl: #include {inc}: no such file among the includes"
            ))
        })?;
        out.push_str(&format!("// ---- shaders/{inc}.wgsl (included)\n"));
        expand(inc.as_str(), file.source, defines, &mut out, &mut includes)?;
        done += 1;
    }
    Ok(out)
}

/// Appends `text` specialised by `defines` to `out`, one output line per input line; names
/// that `#include` lines ask for are added to `includes` (each once).
fn expand(
    name: &str,
    text: &str,
    defines: &[(String, String)],
    out: &mut String,
    includes: &mut Vec<String>,
) -> Result<()> {
    let err = |line: usize, msg: String| Error::Other(format!("shaders/{name}.wgsl:{line}: {msg}"));
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
        if let Some(inc) = trimmed.strip_prefix("#include ") {
            let inc = inc.trim().to_string();
            if !includes.contains(&inc) {
                includes.push(inc);
            }
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
    Ok(())
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

    #[test]
    fn appends_each_include_once_after_the_text() {
        let src =
            "l1\n#include gelu\nl3\n#if X\n#include gelu\n#endif\n#if !X\n#include nope\n#endif";
        // The second `#include gelu` is the same file; `nope` sits in an inactive branch.
        let out = preprocess("t", src, &d(&[("X", "1")])).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "l1");
        assert_eq!(lines[2], "l3");
        let gelu = INCLUDES.iter().find(|f| f.name == "gelu").unwrap().source;
        let tail = &lines[9..];
        assert_eq!(tail[0], "// ---- shaders/gelu.wgsl (included)");
        assert_eq!(tail[1..], gelu.lines().collect::<Vec<_>>()[..]);
        // An include that does not exist is an error naming the file that asked for it.
        let e = preprocess("t", "#include nope", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("shaders/t.wgsl") && e.contains("nope"), "{e}");
    }
}
