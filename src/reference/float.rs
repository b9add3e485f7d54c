//! The floating-point type the whole-model reference computes in: f64 for the reference itself,
//! f32 for the rounding error a plain single-precision implementation of the same step makes.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// What the reference model needs of a floating-point type. Every operation rounds to the type,
/// as the type's own arithmetic does; nothing is carried in a wider type.
pub trait Float:
    Copy
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// The nearest value of the type.
    fn of(x: f64) -> Self;
    /// An f32 value, exactly.
    fn of_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn sqrt(self) -> Self;
    fn powi(self, n: i32) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = $t::NEG_INFINITY;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn of_f32(x: f32) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn to_f32(self) -> f32 {
                self as f32
            }
            fn exp(self) -> Self {
                $t::exp(self)
            }
            fn ln(self) -> Self {
                $t::ln(self)
            }
            fn tanh(self) -> Self {
                $t::tanh(self)
            }
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            fn powi(self, n: i32) -> Self {
                $t::powi(self, n)
            }
            fn max(self, other: Self) -> Self {
                $t::max(self, other)
            }
            fn min(self, other: Self) -> Self {
                $t::min(self, other)
            }
        }
    };
}

impl_float!(f32);
impl_float!(f64);

/// `sum_i f(x_i)` by pairwise summation: the rounding error grows with the logarithm of the length
/// rather than with the length, as in any careful implementation of a long reduction (the
/// gradient norm sums over every parameter).
pub fn pairwise_sum<F: Float>(x: &[F], f: &impl Fn(F) -> F) -> F {
    const LEAF: usize = 256;
    if x.len() <= LEAF {
        x.iter().map(|&v| f(v)).sum()
    } else {
        let (a, b) = x.split_at(x.len() / 2);
        pairwise_sum(a, f) + pairwise_sum(b, f)
    }
}
