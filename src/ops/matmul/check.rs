//! The start-up self-check of the cooperative-matrix kernel against the tiled kernel, and the
//! switch that turns cooperative matrices off.

use super::choice::usable_coop_tiles;
use super::tiled::TILE_CONFIGS;
use super::{
    matmul_backward_input, matmul_backward_weight, matmul_forward, MatmulBackwardInput,
    MatmulBackwardWeight, MatmulForward, MatmulKernel,
};
use crate::error::Result;
use crate::gpu::{DType, Dispatch, Gpu, Tensor};

/// Whether the value of `WGPT_NO_COOPMAT` turns the cooperative-matrix kernel off: any value but
/// empty or `0`.
pub fn coop_disabled_by_env(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether f16 products on `gpu` run on cooperative matrices: `Ok`, or `Err` saying why not
/// (`WGPT_NO_COOPMAT` set, an adapter without 16x16 f16 cooperative matrices, or a failed
/// self-check). Decided once per [`Gpu`], the first time it is asked (the launchers ask at
/// their first f16 product): the self-check runs the three products of a Linear layer (and the
/// bias gradient summed with the weight gradient) at awkward shapes through every usable cooperative-matrix tile and through the tiled kernel
/// (see [`agreement_with_tiled`]); a relative difference above the bound of its output type
/// ([`self_check_tolerance`]: f32 rounding for f32 outputs, one f16 rounding for f16 ones, which
/// a driver that sums in f16 exceeds), any NaN or any error turns cooperative matrices off for
/// this device, with one line on stderr saying why.
pub fn coop_matmul_status(gpu: &Gpu) -> std::result::Result<(), String> {
    gpu.coop_matmul
        .get_or_init(|| {
            if coop_disabled_by_env(std::env::var_os("WGPT_NO_COOPMAT").as_deref()) {
                return Err("WGPT_NO_COOPMAT is set".into());
            }
            let tiles = usable_coop_tiles(gpu)?;
            for tile in tiles {
                if let Err(why) = agreement_with_tiled(gpu, MatmulKernel::Coop(tile)) {
                    eprintln!(
                        "wgpt: cooperative matrices disabled on '{}': {why}; f16 matmuls use \
                         the tiled kernel",
                        gpu.info.name
                    );
                    return Err(why);
                }
            }
            Ok(())
        })
        .clone()
}

/// Largest relative difference (max-norm) the self-check accepts between an f32 output of a
/// kernel and the tiled kernel's. Both sum the same products (an f16 times an f16 is exact in
/// f32) in f32, in different orders, which leaves differences of a few f32 roundings of the
/// partial sums, far below this; sums kept in f16 (a driver whose cooperative matrices
/// accumulate in f16) are some 1e-3 off.
pub const SELF_CHECK_F32_TOLERANCE: f32 = 1e-5;
/// Largest relative difference (max-norm) the self-check accepts between an f16 output of a
/// kernel and the tiled kernel's: one f16 rounding. The two f32 sums, a few f32 roundings
/// apart, round to the same f16 value or, next to a rounding boundary, to neighbouring ones, one
/// f16 ulp (at most 2^-10 = 9.8e-4 of the value) apart.
pub const SELF_CHECK_F16_TOLERANCE: f32 = 1e-3;

/// The self-check's bound on an output stored in `dtype`: [`SELF_CHECK_F16_TOLERANCE`] for f16,
/// [`SELF_CHECK_F32_TOLERANCE`] otherwise.
pub fn self_check_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => SELF_CHECK_F16_TOLERANCE,
        _ => SELF_CHECK_F32_TOLERANCE,
    }
}

/// (M, K, N) of the self-check: more than one tile of every size in each output dimension, none
/// a multiple of 16, and several k steps with a ragged last one, for all three products; K a
/// multiple of 8, so that packet loads, element loads and (f32 outputs 296 wide) the direct
/// store of whole tiles all run.
const SELF_CHECK_SHAPE: (usize, usize, usize) = (277, 296, 269);

/// Runs matmul_forward (with an f32 bias, f16 output), matmul_backward_input and
/// matmul_backward_weight with and without its bias gradient (f32 outputs) on seeded f16 inputs at (M, K, N) = (277, 296, 269)
/// through `candidate` and through the tiled kernel, outputs poisoned with NaN first, and
/// returns the largest relative difference (max-norm) of the candidate from the tiled kernel.
/// `Err` says which product disagreed by more than the bound of its output type
/// ([`self_check_tolerance`]), left an output unwritten, or failed to run.
pub fn agreement_with_tiled(
    gpu: &Gpu,
    candidate: MatmulKernel,
) -> std::result::Result<f32, String> {
    let (m, k, n) = SELF_CHECK_SHAPE;
    let setup = || -> Result<[Tensor; 4]> {
        let mut rng = crate::rng::Rng::new(0x5e1f_c4ec);
        let f16 = DType::F16;
        Ok([
            gpu.upload(
                "self-check inp",
                &rng.vec_uniform(m * k, -1.0, 1.0),
                &[m, k],
                f16,
            )?,
            gpu.upload(
                "self-check weight",
                &rng.vec_uniform(n * k, -1.0, 1.0),
                &[n, k],
                f16,
            )?,
            gpu.upload(
                "self-check dout",
                &rng.vec_uniform(m * n, -1.0, 1.0),
                &[m, n],
                f16,
            )?,
            gpu.upload(
                "self-check bias",
                &rng.vec_uniform(n, -1.0, 1.0),
                &[n],
                DType::F32,
            )?,
        ])
    };
    if !gpu.has_f16() {
        return Err(format!("adapter '{}' has no SHADER_F16", gpu.info.name));
    }
    let [inp, weight, dout, bias] = setup().map_err(|e| e.to_string())?;
    let reference = MatmulKernel::Tiled(TILE_CONFIGS[TILE_CONFIGS.len() - 1]);
    type Build<'a> = Box<dyn Fn(&Tensor, MatmulKernel) -> Result<Dispatch> + 'a>;
    let cases: [(&str, [usize; 3], DType, Build); 4] = [
        (
            "matmul_forward",
            [m, k, n],
            DType::F16,
            Box::new(|out, kernel| {
                let opts = MatmulForward {
                    bias: Some(&bias),
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_forward(gpu, out, &inp, &weight, &opts)
            }),
        ),
        (
            "matmul_backward_input",
            [m, n, k],
            DType::F32,
            Box::new(|out, kernel| {
                let opts = MatmulBackwardInput {
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_backward_input(gpu, out, &dout, &weight, &opts)
            }),
        ),
        (
            "matmul_backward_weight",
            [n, m, k],
            DType::F32,
            Box::new(|out, kernel| {
                let opts = MatmulBackwardWeight {
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_backward_weight(gpu, out, &dout, &inp, &opts)
            }),
        ),
        (
            // The bias gradient summed with it: dout^T (n x m) times a column of ones.
            "matmul_backward_weight's dbias",
            [n, m, 1],
            DType::F32,
            Box::new(|out, kernel| {
                let dweight = gpu.zeros("self-check dweight", &[n, k], DType::F32)?;
                let opts = MatmulBackwardWeight {
                    dbias: Some(out),
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_backward_weight(gpu, &dweight, &dout, &inp, &opts)
            }),
        ),
    ];
    let mut worst = 0f32;
    for (op, [rows, inner, cols], dtype, build) in cases {
        let what = format!("{op} ({rows}x{inner} by {inner}x{cols}) on {candidate}");
        let run = || -> Result<(Vec<f32>, Vec<f32>)> {
            let want = gpu.zeros("self-check reference", &[rows, cols], dtype)?;
            let got = gpu.zeros("self-check candidate", &[rows, cols], dtype)?;
            gpu.poison(&want)?;
            gpu.poison(&got)?;
            let by_reference = build(&want, reference)?;
            let by_candidate = build(&got, candidate)?;
            gpu.run(&[&by_reference, &by_candidate])?;
            Ok((gpu.read(&got)?, gpu.read(&want)?))
        };
        let (got, want) = run().map_err(|e| format!("{what} failed: {e}"))?;
        let err = relative_difference(&got, &want).map_err(|e| format!("{what}: {e}"))?;
        let tol = self_check_tolerance(dtype);
        if err.is_nan() || err > tol {
            return Err(format!(
                "{what} differs from the tiled kernel by {err:.3e} (relative, max-norm; \
                 allowed {tol:.0e} for a {} output)",
                dtype.name()
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// `max |got - want| / max |want|`, or `Err` naming the first non-finite element of either.
pub fn relative_difference(got: &[f32], want: &[f32]) -> std::result::Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{} elements against {}", got.len(), want.len()));
    }
    if let Some(i) = want.iter().position(|x| !x.is_finite()) {
        return Err(format!("the tiled kernel's element {i} is {}", want[i]));
    }
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "element {i} is {} (not written, or overflowed)",
            got[i]
        ));
    }
    let scale = want.iter().fold(0f64, |s, &w| s.max(f64::from(w).abs()));
    let diff = got.iter().zip(want).fold(0f64, |d, (&g, &w)| {
        d.max((f64::from(g) - f64::from(w)).abs())
    });
    Ok((diff / scale.max(1e-30)) as f32)
}

#[cfg(test)]
mod tests {
    use super::super::coop::{CoopTile, COOP_TILES};
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn env_switch_reads_any_value_but_empty_or_zero_as_off() {
        assert!(!coop_disabled_by_env(None));
        assert!(!coop_disabled_by_env(Some(OsStr::new(""))));
        assert!(!coop_disabled_by_env(Some(OsStr::new("0"))));
        assert!(coop_disabled_by_env(Some(OsStr::new("1"))));
        assert!(coop_disabled_by_env(Some(OsStr::new("yes"))));
    }

    #[test]
    fn relative_difference_catches_mismatch_and_unwritten_elements() {
        let want = [1.0, -2.0, 4.0];
        assert_eq!(relative_difference(&want, &want), Ok(0.0));
        let err = relative_difference(&[1.0, -2.0, 4.2], &want).unwrap();
        assert!((err - 0.05).abs() < 1e-6, "{err}");
        // A transposed or misplaced fragment gives an O(1) difference.
        assert!(relative_difference(&[4.0, -2.0, 1.0], &want).unwrap() > SELF_CHECK_F16_TOLERANCE);
        let e = relative_difference(&[1.0, f32::NAN, 4.0], &want).unwrap_err();
        assert!(e.contains("element 1"), "{e}");
        assert!(relative_difference(&want, &[1.0, f32::INFINITY, 4.0]).is_err());
        assert!(relative_difference(&want[..2], &want).is_err());
    }

    #[test]
    fn self_check_shape_is_ragged_for_every_tile() {
        let (m, k, n) = SELF_CHECK_SHAPE;
        for t in COOP_TILES {
            for (rows, cols) in [(m, n), (m, k), (n, k)] {
                let (bm, bn) = (t.bm() as usize, t.bn() as usize);
                assert!(rows > bm && rows % bm != 0 && cols > bn && cols % bn != 0);
            }
        }
        for dim in [m, k, n] {
            assert!(dim % 16 != 0 && dim > CoopTile::BK as usize);
        }
    }
}
