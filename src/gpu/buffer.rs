//! Tensors' memory: new buffers, writes from the CPU, read-backs, and waiting for the GPU.

use super::{DType, Gpu, Tensor};
use crate::error::{Error, Result};

impl Gpu {
    fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let max = self
            .limits
            .max_buffer_size
            .min(self.limits.max_storage_buffer_binding_size);
        if bytes > max {
            return Err(Error::Limit {
                what: what.to_string(),
                needed: format!("a buffer of {} MiB", bytes.div_ceil(1 << 20)),
                available: format!("at most {} MiB per buffer", max >> 20),
                adapter: self.info.name.clone(),
                hint: "use a smaller model, batch or sequence length, or f16 precision".into(),
            });
        }
        Ok(())
    }

    /// A new zero-filled tensor.
    pub fn zeros(&self, label: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = ((n * dtype.size()) as u64).div_ceil(256).max(1) * 256;
        self.check_size(label, bytes)?;
        let buffer = self.scoped(label, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A new tensor holding `data` (converted to `dtype`).
    pub fn upload(
        &self,
        label: &str,
        data: &[f32],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let t = self.zeros(label, shape, dtype)?;
        self.write(&t, data)?;
        Ok(t)
    }

    /// A new u32 tensor holding `data`.
    pub fn upload_u32(&self, label: &str, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        let t = self.zeros(label, shape, DType::U32)?;
        self.write_u32(&t, data)?;
        Ok(t)
    }

    /// Encodes f32 values as the bytes of `dtype`.
    pub fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
            DType::U32 => {
                let u: Vec<u32> = data.iter().map(|&x| x as u32).collect();
                bytemuck::cast_slice(&u).to_vec()
            }
        }
    }

    /// Writes `data` into `t` (queued; visible to the next submission).
    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        t.expect_len("write", "data", data.len())?;
        self.write_bytes(t, &Self::encode(data, t.dtype))
    }

    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<()> {
        t.expect_len("write", "data", data.len())?;
        self.write_bytes(t, bytemuck::cast_slice(data))
    }

    /// Writes raw bytes at the start of `t`, padded to whole words.
    pub fn write_bytes(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer, t.offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(&t.buffer, t.offset, &padded);
        }
        Ok(())
    }

    /// Fills `t` with NaN (f32/f16) or 0xFFFFFFFF (u32), so an element a kernel fails to write
    /// is caught by the comparison that follows.
    pub fn poison(&self, t: &Tensor) -> Result<()> {
        let words = (t.byte_size() / 4) as usize;
        let word: u32 = match t.dtype {
            DType::F32 => 0x7fc0_0000,
            DType::F16 => 0x7e00_7e00,
            DType::U32 => u32::MAX,
        };
        self.write_bytes(t, bytemuck::cast_slice(&vec![word; words]))
    }

    /// Copies `t` back to the CPU as raw bytes (exactly `len * size` bytes).
    pub fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let size = t.byte_size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read-back"),
            });
        encoder.copy_buffer_to_buffer(&t.buffer, t.offset, &staging, 0, size);
        self.scoped("read-back", || self.queue.submit([encoder.finish()]))?;
        let mut bytes = self.map_read(&staging, size)?;
        bytes.truncate(t.len() * t.dtype.size());
        Ok(bytes)
    }

    /// Waits for the GPU, then maps the first `len` bytes of a MAP_READ buffer (filled by work
    /// already submitted) and copies them out.
    pub fn map_read(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.map_read_after(staging, len, None)
    }

    /// [`Gpu::map_read`] waiting only for submission `index` (and those before it), not for
    /// work queued since: how a step's statistics are read while the next step runs.
    pub fn map_read_after(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        index: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        self.map_read_with(staging, len, index, |bytes| bytes.to_vec())
    }

    /// Maps the first `len` bytes of `staging` once submission `index` has finished and hands
    /// them to `read` (without a copy), then unmaps.
    pub fn map_read_with<T>(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        index: Option<wgpu::SubmissionIndex>,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let slice = staging.slice(..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait_for(index)?;
        rx.recv()
            .map_err(|_| Error::Gpu("read-back never completed".into()))?
            .map_err(|e| Error::Gpu(format!("read-back failed: {e}")))?;
        let value = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("read-back mapping failed: {e}")))?;
            read(&view)
        };
        staging.unmap();
        Ok(value)
    }

    /// Copies `t` back to the CPU as f32 values.
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t)?;
        Ok(match t.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::F16 => {
                let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes);
                h.iter().map(|x| x.to_f32()).collect()
            }
            DType::U32 => {
                let u: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
                u.iter().map(|&x| x as f32).collect()
            }
        })
    }

    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(t)?))
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.wait_for(None)
    }

    /// Blocks until submission `index` has finished (all submitted work when `None`).
    pub fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.check_lost()
    }
}
