//! Kernels declared once: each entry point of a shader file as a [`Kernel`] constant, naming its
//! shader, its entry point and the defines that specialise it. A launcher gives the defines'
//! values in the axes' order ([`Kernel::with`]) to get what its dispatch compiles; the variant
//! list that the tests validate is built from the same constant ([`Kernel::variants`], or
//! [`Kernel::with`] for a kernel whose axes are not independent), so a define's name is written
//! in one place only.

use super::DType;

/// A define of a kernel and the values its validated variants take.
#[derive(Clone, Copy, Debug)]
pub struct Axis {
    pub name: &'static str,
    /// The values [`Kernel::variants`] enumerates; empty for an axis whose values the launcher
    /// computes (a head size, a tile), whose variants its module lists itself.
    pub values: &'static [&'static str],
    /// Whether the define may also be left unset (`#if NAME` is then false).
    pub optional: bool,
}

impl Axis {
    /// A define validated with each of `values`: the values launchers set, or for a size that
    /// only bounds arrays and loops, representative ones.
    pub const fn new(name: &'static str, values: &'static [&'static str]) -> Axis {
        Axis {
            name,
            values,
            optional: false,
        }
    }

    /// A define set to one of `values` or left unset.
    pub const fn optional(name: &'static str, values: &'static [&'static str]) -> Axis {
        Axis {
            name,
            values,
            optional: true,
        }
    }

    /// A define whose value the launcher computes (a size): the kernel's module lists the
    /// values its variants take, through [`Kernel::with`].
    pub const fn computed(name: &'static str) -> Axis {
        Axis {
            name,
            values: &[],
            optional: false,
        }
    }

    /// A define left unset or set to a value the launcher computes.
    pub const fn computed_optional(name: &'static str) -> Axis {
        Axis {
            name,
            values: &[],
            optional: true,
        }
    }
}

/// One entry point of a shader file and the defines that specialise it: `fixed` ones, the same
/// in every specialisation (the `#if` that selects the entry point's part of the file, for one),
/// then the `N` axes, whose values a launcher gives in order.
#[derive(Clone, Copy, Debug)]
pub struct Kernel<const N: usize> {
    /// The shader file's name (`shaders/NAME.wgsl`).
    pub shader: &'static str,
    pub entry: &'static str,
    pub fixed: &'static [(&'static str, &'static str)],
    pub axes: [Axis; N],
}

/// A kernel specialised by values of its defines: what a dispatch compiles (with the layout of
/// its bindings, a [`PipelineKey`](super::PipelineKey)) and what the variant list validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Specialisation {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
}

/// A value a define can take: its text, or `None` to leave the define unset.
pub trait DefineValue {
    fn define_value(&self) -> Option<String>;
}

impl DefineValue for &str {
    fn define_value(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl DefineValue for String {
    fn define_value(&self) -> Option<String> {
        Some(self.clone())
    }
}

impl DefineValue for u32 {
    fn define_value(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl DefineValue for usize {
    fn define_value(&self) -> Option<String> {
        Some(self.to_string())
    }
}

/// `true` or `false`.
impl DefineValue for bool {
    fn define_value(&self) -> Option<String> {
        Some(self.to_string())
    }
}

/// The WGSL type name.
impl DefineValue for DType {
    fn define_value(&self) -> Option<String> {
        Some(self.wgsl().to_string())
    }
}

/// Unset when `None`.
impl<T: DefineValue> DefineValue for Option<T> {
    fn define_value(&self) -> Option<String> {
        self.as_ref().and_then(|v| v.define_value())
    }
}

impl<const N: usize> Kernel<N> {
    /// The kernel specialised by `values`, one per axis in order (a `None` leaves an optional
    /// define unset).
    pub fn with(&self, values: [&dyn DefineValue; N]) -> Specialisation {
        let mut defines: Vec<(String, String)> = self
            .fixed
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (axis, value) in self.axes.iter().zip(values) {
            if let Some(v) = value.define_value() {
                defines.push((axis.name.to_string(), v));
            }
        }
        Specialisation {
            shader: self.shader,
            entry: self.entry,
            defines,
        }
    }

    /// Every combination of the axes' values (with "unset" for the optional ones). Only for a
    /// kernel without computed axes: its module lists those kernels' variants itself.
    pub fn variants(&self) -> Vec<Specialisation> {
        let mut out: Vec<Vec<Option<&str>>> = vec![Vec::new()];
        for axis in &self.axes {
            assert!(
                !axis.values.is_empty(),
                "shaders/{}.wgsl {}: {} is computed by the launcher; list the variants with \
                 Kernel::with",
                self.shader,
                self.entry,
                axis.name
            );
            let mut values: Vec<Option<&str>> = Vec::new();
            if axis.optional {
                values.push(None);
            }
            values.extend(axis.values.iter().map(|v| Some(*v)));
            out = out
                .into_iter()
                .flat_map(|d| {
                    values.iter().map(move |v| {
                        let mut d = d.clone();
                        d.push(*v);
                        d
                    })
                })
                .collect();
        }
        out.into_iter()
            .map(|values| {
                let refs: Vec<&dyn DefineValue> =
                    values.iter().map(|v| v as &dyn DefineValue).collect();
                let refs: [&dyn DefineValue; N] = refs
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("one value per axis"));
                self.with(refs)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kernel<3> = Kernel {
        shader: "s",
        entry: "e",
        fixed: &[("GATE", "1")],
        axes: [
            Axis::new("T", &["f32", "f16"]),
            Axis::new("SUBGROUPS", &["false", "true"]),
            Axis::optional("COPY", &["f16"]),
        ],
    };

    #[test]
    fn with_puts_fixed_defines_first_and_leaves_unset_ones_out() {
        let s = K.with([&DType::F16, &true, &None::<&str>]);
        let d: Vec<(&str, &str)> = s
            .defines
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(d, [("GATE", "1"), ("T", "f16"), ("SUBGROUPS", "true")]);
        assert_eq!((s.shader, s.entry), ("s", "e"));
    }

    #[test]
    fn variants_are_every_combination() {
        let v = K.variants();
        assert_eq!(v.len(), 2 * 2 * 2);
        assert!(v.contains(&K.with([&"f32", &false, &Some("f16")])));
        assert!(v.contains(&K.with([&"f16", &true, &None::<&str>])));
    }
}
