//! Compute pipelines: what identifies one ([`PipelineKey`]), the compiled shader modules and
//! pipelines kept for the process, and the driver's pipeline cache kept on disk between runs.

use super::{shader, Gpu};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The pipeline cache's folder: `$WGPT_CACHE_DIR` (empty: no cache), else
/// `$XDG_CACHE_HOME/wgpt`, else `$HOME/.cache/wgpt`.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("WGPT_CACHE_DIR") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("wgpt"))
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|d| !d.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache").join("wgpt"))
            }),
    }
}

/// Whether shaders are created with wgpu's runtime checks (every array index clamped, every
/// loop bounded), from the value of `WGPT_SHADER_CHECKS`: on for `1`, `true`, `on` or `yes`.
/// Off by default: the engine's shaders are proven by the tests and every launch checks its
/// shapes, and the checks keep drivers from unrolling the kernels' register-blocked loops.
pub fn shader_checks_from_env(value: Option<&std::ffi::OsStr>) -> bool {
    value
        .and_then(|v| v.to_str())
        .map(|v| {
            matches!(
                v.trim().to_lowercase().as_str(),
                "1" | "true" | "on" | "yes"
            )
        })
        .unwrap_or(false)
}

/// A pipeline cache loaded from and saved to a file.
pub(super) struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Pipelines were created since the last save.
    dirty: std::sync::atomic::AtomicBool,
}

/// How a binding is used by a shader; binding `i` of group 0 is the `i`-th of a dispatch's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BindKind {
    Uniform,
    Read,
    ReadWrite,
}

/// Everything that identifies a compute pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
    pub layout: Vec<BindKind>,
}

impl PipelineKey {
    fn label(&self) -> String {
        let defs: Vec<String> = self
            .defines
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}::{}[{}]", self.shader, self.entry, defs.join(","))
    }
}

/// A cached pipeline and the layout its bind groups are made with.
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group_layout: wgpu::BindGroupLayout,
    pub label: String,
}

/// A shader file and its defines: one compiled module.
pub(super) type ModuleKey = (String, Vec<(String, String)>);

impl Gpu {
    /// The pipeline cache kept in `dir` for this adapter and driver, when the device has
    /// PIPELINE_CACHE. A missing, unreadable or stale file only means compiling anew.
    pub(super) fn open_pipeline_cache(&self, dir: &Path) -> Option<DiskCache> {
        if !self.features.contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(&self.info)?;
        let path = dir.join(key);
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is what `PipelineCache::get_data` wrote for an adapter with this
        // key (written whole: to a temporary file, then renamed); with `fallback` the driver
        // validates it against its own header and starts empty when it does not match.
        let cache = unsafe {
            self.device
                .create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                    label: Some("wgpt pipeline cache"),
                    data: data.as_deref(),
                    fallback: true,
                })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the pipeline cache is kept, when there is one.
    pub fn pipeline_cache_path(&self) -> Option<&Path> {
        self.pipeline_cache.as_ref().map(|c| c.path.as_path())
    }

    /// Writes the pipeline cache to its file if pipelines were compiled since the last save
    /// (a temporary file, then renamed: never a half-written cache). Returns whether it wrote.
    pub fn save_pipeline_cache(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let Some(c) = &self.pipeline_cache else {
            return Ok(false);
        };
        if !c.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let Some(data) = c.cache.get_data() else {
            return Ok(false);
        };
        if let Some(dir) = c.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = c.path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &data).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &c.path).map_err(|e| Error::io(&c.path, e))?;
        Ok(true)
    }

    fn bind_group_layout(&self, kinds: &[BindKind]) -> wgpu::BindGroupLayout {
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        layouts
            .entry(kinds.to_vec())
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: match k {
                            BindKind::Uniform => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            BindKind::Read => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: true },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            BindKind::ReadWrite => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: false },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                        },
                        count: None,
                    })
                    .collect();
                let label: Vec<&str> = kinds
                    .iter()
                    .map(|k| match k {
                        BindKind::Uniform => "u",
                        BindKind::Read => "r",
                        BindKind::ReadWrite => "w",
                    })
                    .collect();
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&format!("layout {}", label.join(""))),
                        entries: &entries,
                    })
            })
            .clone()
    }

    /// The pipeline for `key`, compiled on first use and cached.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<Pipeline>> {
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(p.clone());
        }
        let label = key.label();
        let module_key = (key.shader.to_string(), key.defines.clone());
        let cached_module = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&module_key)
            .cloned();
        let module = match cached_module {
            Some(m) => m,
            None => {
                let text =
                    shader::preprocess(key.shader, shader::source(key.shader)?, &key.defines)?;
                let m = self.scoped(&format!("compiling shaders/{}.wgsl", key.shader), || {
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(&label),
                        source: wgpu::ShaderSource::Wgsl(text.into()),
                    };
                    if self.shader_checks {
                        self.device.create_shader_module(desc)
                    } else {
                        // SAFETY: only the engine's own shaders are created here; every
                        // launcher checks the shapes and lengths of what it binds, and the
                        // tests run every kernel against CPU references (also with the checks
                        // on, WGPT_SHADER_CHECKS=1) on shapes that reach every edge path.
                        unsafe {
                            self.device.create_shader_module_trusted(
                                desc,
                                wgpu::ShaderRuntimeChecks::unchecked(),
                            )
                        }
                    }
                })?;
                self.modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(module_key, m.clone());
                m
            }
        };
        let bind_group_layout = self.bind_group_layout(&key.layout);
        let pipeline = self.scoped(&format!("pipeline {label}"), || {
            let layout = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&label),
                    bind_group_layouts: &[Some(&bind_group_layout)],
                    immediate_size: 0,
                });
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: self.pipeline_cache.as_ref().map(|c| &c.cache),
                })
        })?;
        if let Some(c) = &self.pipeline_cache {
            c.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        let p = Arc::new(Pipeline {
            pipeline,
            bind_group_layout,
            label,
        });
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), p.clone());
        Ok(p)
    }
}
