//! A tensor on the GPU: a typed, shaped view into a buffer.

use crate::error::{Error, Result};

/// Element types that live in GPU buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }

    /// The WGSL scalar type name.
    pub fn wgsl(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }

    pub fn name(self) -> &'static str {
        self.wgsl()
    }
}

/// A view of `len` elements of type `dtype` starting `offset` bytes into `buffer`.
///
/// Cloning a tensor clones the handle, not the data.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub buffer: wgpu::Buffer,
    /// Byte offset of the first element; a multiple of the adapter's storage offset alignment.
    pub offset: u64,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Tensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes covered by the view, rounded up to a whole number of 4-byte words.
    pub fn byte_size(&self) -> u64 {
        ((self.len() * self.dtype.size()) as u64).div_ceil(4) * 4
    }

    /// The same elements seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot view {:?} ({} elements) as {shape:?}",
                    self.shape,
                    self.len()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// A view of elements `[start, start + product(shape))`. The byte offset of the view must
    /// respect `alignment` (the adapter's `min_storage_buffer_offset_alignment`).
    pub fn slice(&self, start: usize, shape: &[usize], alignment: u64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if start + n > self.len() {
            return Err(Error::shape(
                "slice",
                format!(
                    "elements {start}..{} are outside a tensor of {}",
                    start + n,
                    self.len()
                ),
            ));
        }
        let offset = self.offset + (start * self.dtype.size()) as u64;
        if !offset.is_multiple_of(alignment) {
            return Err(Error::shape(
                "slice",
                format!(
                    "byte offset {offset} is not a multiple of the adapter's alignment {alignment}"
                ),
            ));
        }
        Ok(Tensor {
            buffer: self.buffer.clone(),
            offset,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    /// Checks this tensor has exactly `shape`, naming `op` and `what` otherwise.
    pub fn expect_shape(&self, op: &'static str, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(
                op,
                format!("{what} has shape {:?}, expected {shape:?}", self.shape),
            ));
        }
        Ok(())
    }

    /// Checks this tensor has `n` elements whatever its shape.
    pub fn expect_len(&self, op: &'static str, what: &str, n: usize) -> Result<()> {
        if self.len() != n {
            return Err(Error::shape(
                op,
                format!(
                    "{what} has {} elements (shape {:?}), expected {n}",
                    self.len(),
                    self.shape
                ),
            ));
        }
        Ok(())
    }

    pub fn expect_dtype(&self, op: &'static str, what: &str, dtypes: &[DType]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            return Err(Error::shape(
                op,
                format!(
                    "{what} is {}, expected one of {dtypes:?}",
                    self.dtype.name()
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: wgpu::BufferSize::new(self.byte_size().max(4)),
        })
    }
}
