//! The launchers' checks of what they bind, one set for every op: storage types, lengths and
//! shapes, counts that must fit the shaders' u32 arithmetic, and outputs that may not alias
//! inputs. Each error names the op and the tensor, and says what was expected.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};

/// The checks of one launch of `op` on `gpu`.
#[derive(Clone, Copy)]
pub(crate) struct Check<'a> {
    gpu: &'a Gpu,
    op: &'static str,
}

impl<'a> Check<'a> {
    pub(crate) fn new(gpu: &'a Gpu, op: &'static str) -> Check<'a> {
        Check { gpu, op }
    }

    /// The op's name, for labels and limit errors.
    pub(crate) fn op(&self) -> &'static str {
        self.op
    }

    /// The device the launch is for.
    pub(crate) fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    /// An error of this op saying `message`.
    pub(crate) fn error(&self, message: impl Into<String>) -> Error {
        Error::shape(self.op, message)
    }

    /// The checks of the tensor `t`, called `what` in messages.
    pub(crate) fn arg<'t>(&self, what: &'t str, t: &'t Tensor) -> Arg<'t>
    where
        'a: 't,
    {
        Arg {
            check: *self,
            what,
            t,
        }
    }

    /// `n` as the u32 the shaders index with, or an error when it does not fit.
    pub(crate) fn fits_u32(&self, what: &str, n: usize) -> Result<u32> {
        u32::try_from(n).map_err(|_| self.error(format!("{what} = {n} does not fit in 32 bits")))
    }

    /// No output shares a buffer with an input (wgpu refuses a buffer bound both read-only and
    /// writable in one dispatch), and no two outputs overlap.
    pub(crate) fn no_alias(
        &self,
        outputs: &[(&str, &Tensor)],
        inputs: &[(&str, &Tensor)],
    ) -> Result<()> {
        for (i, (out_name, out)) in outputs.iter().enumerate() {
            for (in_name, inp) in inputs {
                if out.buffer == inp.buffer {
                    return Err(self.error(format!(
                        "{out_name} shares a buffer with {in_name}; outputs may not alias inputs"
                    )));
                }
            }
            for (other_name, other) in &outputs[i + 1..] {
                if overlaps(out, other) {
                    return Err(self.error(format!("{out_name} overlaps {other_name}")));
                }
            }
        }
        Ok(())
    }
}

/// Whether two tensor views share any byte.
fn overlaps(x: &Tensor, y: &Tensor) -> bool {
    x.buffer == y.buffer
        && x.offset < y.offset + y.byte_size()
        && y.offset < x.offset + x.byte_size()
}

/// The checks of one tensor of a launch; each returns the checks again, to chain them.
#[derive(Clone, Copy)]
pub(crate) struct Arg<'t> {
    check: Check<'t>,
    what: &'t str,
    t: &'t Tensor,
}

impl Arg<'_> {
    fn error(&self, message: String) -> Error {
        self.check.error(message)
    }

    /// The tensor checked.
    pub(crate) fn tensor(&self) -> &Tensor {
        self.t
    }

    /// Floats the adapter can read: f32, or f16 where it has SHADER_F16.
    pub(crate) fn float(self) -> Result<Self> {
        let what = self.what;
        match self.t.dtype {
            DType::F32 => Ok(self),
            DType::F16 if self.check.gpu.has_f16() => Ok(self),
            DType::F16 => Err(self.error(format!(
                "{what} is f16 but the adapter '{}' has no SHADER_F16; use f32",
                self.check.gpu.info.name
            ))),
            DType::U32 => Err(self.error(format!("{what} is u32, expected f32 or f16"))),
        }
    }

    /// f32.
    pub(crate) fn f32(self) -> Result<Self> {
        self.dtype(&[DType::F32])
    }

    /// u32 (token ids, buckets, state).
    pub(crate) fn u32(self) -> Result<Self> {
        self.dtype(&[DType::U32])
    }

    /// One of `dtypes`.
    pub(crate) fn dtype(self, dtypes: &[DType]) -> Result<Self> {
        self.t.expect_dtype(self.check.op, self.what, dtypes)?;
        Ok(self)
    }

    /// `n` elements, whatever the shape.
    pub(crate) fn len(self, n: usize) -> Result<Self> {
        self.t.expect_len(self.check.op, self.what, n)?;
        Ok(self)
    }

    /// At least `n` elements; `sized_by` names what gives the length (a scratch's `_len`
    /// function).
    pub(crate) fn at_least(self, n: usize, sized_by: &str) -> Result<Self> {
        if self.t.len() < n {
            return Err(self.error(format!(
                "{} has {} elements, needs at least {n} ({sized_by})",
                self.what,
                self.t.len()
            )));
        }
        Ok(self)
    }

    /// One of `shapes`.
    pub(crate) fn shape_in(self, shapes: &[&[usize]]) -> Result<Self> {
        if !shapes.contains(&&self.t.shape[..]) {
            let want: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
            return Err(self.error(format!(
                "{} has shape {:?}, expected {}",
                self.what,
                self.t.shape,
                want.join(" or ")
            )));
        }
        Ok(self)
    }

    /// A non-empty vector; returns its length.
    pub(crate) fn vector(self) -> Result<usize> {
        match self.t.shape[..] {
            [n] if n > 0 => Ok(n),
            _ => Err(self.error(format!(
                "{} has shape {:?}, expected [n] with n > 0",
                self.what, self.t.shape
            ))),
        }
    }

    /// A matrix of at least `min_rows` rows (and one) and at least one column; returns (rows,
    /// columns).
    pub(crate) fn matrix(self, min_rows: usize) -> Result<(usize, usize)> {
        let min_rows = min_rows.max(1);
        match self.t.shape[..] {
            [rows, cols] if rows >= min_rows && cols > 0 => Ok((rows, cols)),
            _ => Err(self.error(format!(
                "{} has shape {:?}, expected a matrix [rows >= {min_rows}, columns > 0]",
                self.what, self.t.shape
            ))),
        }
    }

    /// Rows of `width` elements, leading dimensions flattened: a tensor of rank >= 2 must have
    /// `width` as its last dimension, a flat one a multiple of `width` elements, and neither may
    /// be empty. Returns the number of rows.
    pub(crate) fn rows(self, width: usize) -> Result<usize> {
        let t = self.t;
        let last_ok = t.shape.len() < 2 || t.shape.last() == Some(&width);
        if !last_ok || t.is_empty() || !t.len().is_multiple_of(width) {
            return Err(self.error(format!(
                "{} has shape {:?}, expected (..., {width})",
                self.what, t.shape
            )));
        }
        Ok(t.len() / width)
    }

    /// `rows` rows whose columns `start..start + cols` are used: rows as [`Arg::rows`] counts
    /// them, of the last dimension's length, which must hold those columns. Returns the row
    /// length.
    pub(crate) fn columns(self, rows: usize, start: usize, cols: usize) -> Result<usize> {
        let width = *self.t.shape.last().unwrap_or(&0);
        if width == 0 || start + cols > width {
            return Err(self.error(format!(
                "{} has shape {:?}: columns {start}..{} are outside its rows",
                self.what,
                self.t.shape,
                start + cols
            )));
        }
        self.rows_of(rows, width)?;
        Ok(width)
    }

    /// `rows` rows of `width` elements, as [`Arg::rows`] counts them.
    pub(crate) fn rows_of(self, rows: usize, width: usize) -> Result<Self> {
        let got = self.rows(width)?;
        if got != rows {
            return Err(self.error(format!(
                "{} has shape {:?} ({got} rows), expected {rows} rows of {width}",
                self.what, self.t.shape
            )));
        }
        Ok(self)
    }
}
