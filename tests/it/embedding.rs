//! Token + position embedding forward and backward against the CPU reference; the backward's
//! bucketing, determinism and re-use of one recorded dispatch with new buckets.

use crate::common::*;
use wgpt::gpu::DType;
use wgpt::ops::embedding as emb;
use wgpt::reference::embedding as cpu;

/// (B, T, C, Vp, block).
const SHAPES: [(usize, usize, usize, usize, usize); 5] = [
    (1, 1, 1, 1, 1),
    (2, 5, 3, 11, 7),
    (3, 17, 37, 50, 20),
    (4, 33, 100, 97, 40),
    (2, 64, 768, 300, 64),
];

/// `embedding_forward` with the whole token table in one tensor.
fn forward_whole(
    g: &wgpt::Gpu,
    out: &wgpt::Tensor,
    tokens: &wgpt::Tensor,
    wte: &wgpt::Tensor,
    wpe: &wgpt::Tensor,
    b: usize,
    t: usize,
) -> wgpt::Result<wgpt::Dispatch> {
    let rows = wte.shape[0];
    emb::embedding_forward(
        g,
        &emb::EmbeddingForward {
            out,
            tokens,
            wte,
            piece: emb::TablePiece::whole(rows),
            wpe,
            b,
            t,
        },
    )
}

/// Tokens with many repeats: drawn from a small range, plus the last id.
fn make_tokens(r: &mut wgpt::rng::Rng, n: usize, vp: usize) -> Vec<u32> {
    let range = (vp as u64 / 3).max(1);
    (0..n)
        .map(|i| {
            if i % 7 == 3 {
                vp as u32 - 1
            } else {
                r.below(range) as u32
            }
        })
        .collect()
}

#[test]
fn embedding_forward_matches_reference() {
    for wte_t in float_dtypes() {
        for wpe_t in float_dtypes() {
            for (s, &(b, t, c, vp, block)) in SHAPES.iter().enumerate() {
                let mut r = rng(300 + s as u64);
                let tokens = make_tokens(&mut r, b * t, vp);
                let tt = gpu().upload_u32("tokens", &tokens, &[b * t]).unwrap();
                let (wte_g, wte) = upload("wte", &r.vec_normal(vp * c, 0.5), &[vp, c], wte_t);
                let (wpe_g, wpe) = upload("wpe", &r.vec_normal(block * c, 0.5), &[block, c], wpe_t);
                let out = poisoned("out", &[b, t, c], DType::F32);
                let d = forward_whole(gpu(), &out, &tt, &wte_g, &wpe_g, b, t).unwrap();
                gpu().run(&[&d]).unwrap();
                let mut want = vec![0.0; b * t * c];
                cpu::embedding_forward(&mut want, &tokens, &wte, &wpe, t, c);
                let what = format!(
                    "embedding_forward wte {wte_t:?} wpe {wpe_t:?} B={b} T={t} C={c} Vp={vp}"
                );
                // The inputs are compared as stored: one f32 addition separates GPU and reference.
                assert_close(&what, &read(&out), &want, 1e-6);
            }
        }
    }
}

#[test]
fn bucket_tokens_groups_positions_by_token() {
    let tokens = [5u32, 2, 5, 9, 2, 5, 70];
    let got = emb::bucket_tokens(&tokens, 10);
    assert_eq!(got.len(), emb::embedding_buckets_len(7));
    // Three buckets: token 2 at [1, 4]; 5 at [0, 2, 5]; 9 (70 clamped to Vp-1 = 9) at [3, 6].
    assert_eq!(got[0], 3);
    assert_eq!(&got[1..10], &[2, 0, 2, 5, 2, 3, 9, 5, 2]);
    assert!(
        got[10..22].iter().all(|&x| x == 0),
        "unused bucket slots are zero"
    );
    assert_eq!(&got[22..], &[1, 4, 0, 2, 5, 3, 6]);
    assert_eq!(emb::bucket_tokens(&[], 10), vec![0]);
}

struct Backward {
    dwte: wgpt::Tensor,
    dwpe: wgpt::Tensor,
    buckets: wgpt::Tensor,
    dispatches: Vec<wgpt::Dispatch>,
    init: (Vec<f32>, Vec<f32>),
}

fn backward_setup(
    b: usize,
    t: usize,
    c: usize,
    vp: usize,
    block: usize,
    dout: &wgpt::Tensor,
    r: &mut wgpt::rng::Rng,
) -> Backward {
    let init = (
        r.vec_uniform(vp * c, -1.0, 1.0),
        r.vec_uniform(block * c, -1.0, 1.0),
    );
    let (dwte, _) = upload("dwte", &init.0, &[vp, c], DType::F32);
    let (dwpe, _) = upload("dwpe", &init.1, &[block, c], DType::F32);
    let buckets = poisoned("buckets", &[emb::embedding_buckets_len(b * t)], DType::U32);
    let dispatches = emb::embedding_backward(gpu(), &dwte, &dwpe, dout, &buckets, b, t).unwrap();
    Backward {
        dwte,
        dwpe,
        buckets,
        dispatches,
        init,
    }
}

#[test]
fn embedding_backward_matches_reference() {
    for dout_t in float_dtypes() {
        for (s, &(b, t, c, vp, block)) in SHAPES.iter().enumerate() {
            let mut r = rng(400 + s as u64);
            let (dt, dout) = upload("dout", &r.vec_normal(b * t * c, 1.0), &[b, t, c], dout_t);
            let k = backward_setup(b, t, c, vp, block, &dt, &mut r);
            // One recorded pair of dispatches, two batches: only the buckets change.
            for batch in 0..2 {
                let tokens = make_tokens(&mut r, b * t, vp);
                gpu()
                    .write_u32(&k.buckets, &emb::bucket_tokens(&tokens, vp))
                    .unwrap();
                gpu().write(&k.dwte, &k.init.0).unwrap();
                gpu().write(&k.dwpe, &k.init.1).unwrap();
                gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();
                let (mut want_wte, mut want_wpe) = k.init.clone();
                cpu::embedding_backward(&mut want_wte, &mut want_wpe, &dout, &tokens, t, c);
                let what = format!(
                    "embedding_backward dout {dout_t:?} B={b} T={t} C={c} Vp={vp} batch {batch}"
                );
                assert_close(&format!("{what} dwte"), &read(&k.dwte), &want_wte, 1e-5);
                assert_close(&format!("{what} dwpe"), &read(&k.dwpe), &want_wpe, 1e-5);
            }
        }
    }
}

#[test]
fn embedding_backward_is_deterministic() {
    let (b, t, c, vp, block) = (4, 64, 96, 40, 64);
    let mut r = rng(500);
    let (dt, _) = upload(
        "dout",
        &r.vec_normal(b * t * c, 1.0),
        &[b, t, c],
        DType::F32,
    );
    let k = backward_setup(b, t, c, vp, block, &dt, &mut r);
    // 256 positions over 13 ids: every bucket holds many positions.
    let tokens = make_tokens(&mut r, b * t, vp);
    gpu()
        .write_u32(&k.buckets, &emb::bucket_tokens(&tokens, vp))
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        gpu().write(&k.dwte, &k.init.0).unwrap();
        gpu().write(&k.dwpe, &k.init.1).unwrap();
        gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();
        runs.push((read(&k.dwte), read(&k.dwpe)));
    }
    assert_bitwise_eq("dwte", &runs[0].0, &runs[1].0);
    assert_bitwise_eq("dwpe", &runs[0].1, &runs[1].1);
}

#[test]
fn out_of_range_tokens_are_clamped() {
    let (b, t, c, vp) = (1, 3, 4, 5);
    let tokens = [1u32, 5, 1_000_000];
    let mut r = rng(600);
    let (wte_g, wte) = upload("wte", &r.vec_normal(vp * c, 1.0), &[vp, c], DType::F32);
    let (wpe_g, wpe) = upload("wpe", &r.vec_normal(t * c, 1.0), &[t, c], DType::F32);
    let tt = gpu().upload_u32("tokens", &tokens, &[3]).unwrap();
    let out = poisoned("out", &[b, t, c], DType::F32);
    gpu()
        .run(&[&forward_whole(gpu(), &out, &tt, &wte_g, &wpe_g, b, t).unwrap()])
        .unwrap();
    let mut want = vec![0.0; t * c];
    cpu::embedding_forward(&mut want, &[1, 4, 4], &wte, &wpe, t, c);
    assert_close("forward with clamped ids", &read(&out), &want, 1e-6);

    let (dt, dout) = upload("dout", &r.vec_normal(t * c, 1.0), &[b, t, c], DType::F32);
    let k = backward_setup(b, t, c, vp, t, &dt, &mut r);
    gpu()
        .write_u32(&k.buckets, &emb::bucket_tokens(&tokens, vp))
        .unwrap();
    gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();
    let (mut want_wte, mut want_wpe) = k.init.clone();
    cpu::embedding_backward(&mut want_wte, &mut want_wpe, &dout, &[1, 4, 4], t, c);
    assert_close("backward with clamped ids", &read(&k.dwte), &want_wte, 1e-6);
}

#[test]
fn shape_errors_are_reported() {
    let g = gpu();
    let f = DType::F32;
    let z = |shape: &[usize], dtype| g.zeros("t", shape, dtype).unwrap();
    let (b, t, c) = (2, 3, 4);
    let (out, tokens, wte, wpe) = (
        z(&[b, t, c], f),
        z(&[b * t], DType::U32),
        z(&[10, c], f),
        z(&[5, c], f),
    );
    assert!(forward_whole(g, &out, &tokens, &wte, &wpe, b, t).is_ok());
    let e = forward_whole(g, &out, &tokens, &wte, &z(&[2, c], f), b, t)
        .err()
        .expect("block < T");
    assert!(e.to_string().contains("embedding_forward"), "{e}");
    assert!(forward_whole(g, &out, &tokens, &wte, &z(&[5, c + 1], f), b, t).is_err());
    assert!(forward_whole(g, &z(&[b, t, c + 1], f), &tokens, &wte, &wpe, b, t).is_err());
    assert!(forward_whole(g, &out, &z(&[b * t], f), &wte, &wpe, b, t).is_err());
    assert!(forward_whole(g, &out, &z(&[b * t + 1], DType::U32), &wte, &wpe, b, t).is_err());
    assert!(forward_whole(g, &out, &tokens, &wte, &wpe, 0, t).is_err());
    let buckets = z(&[emb::embedding_buckets_len(b * t)], DType::U32);
    assert!(emb::embedding_backward(g, &wte, &wpe, &out, &buckets, b, t).is_ok());
    let e = emb::embedding_backward(g, &wte, &wpe, &out, &z(&[4], DType::U32), b, t)
        .err()
        .expect("buckets");
    assert!(e.to_string().contains("buckets"), "{e}");
    assert!(emb::embedding_backward(g, &wte, &wpe, &z(&[b, t + 1, c], f), &buckets, b, t).is_err());
    assert!(
        emb::embedding_backward(g, &z(&[10, c], DType::F16), &wpe, &out, &buckets, b, t).is_err()
    );
    assert!(emb::embedding_backward(g, &wte, &z(&[5, c + 1], f), &out, &buckets, b, t).is_err());
}

/// The table split into pieces of rows (as storage does for a table larger than one binding):
/// one launch per piece gives the same forward output and gradients as the whole table.
#[test]
fn a_table_in_pieces_equals_the_whole_table() {
    let (b, t, c, vp, block) = (3, 21, 40, 300, 24);
    for dtype in float_dtypes() {
        let mut r = rng(700);
        let tokens = make_tokens(&mut r, b * t, vp);
        let tt = gpu().upload_u32("tokens", &tokens, &[b * t]).unwrap();
        let wte = r.vec_normal(vp * c, 0.5);
        let (wpe_g, wpe) = upload("wpe", &r.vec_normal(block * c, 0.5), &[block, c], dtype);
        let (dout_g, dout) = upload("dout", &r.vec_normal(b * t * c, 1.0), &[b, t, c], dtype);
        let buckets = gpu()
            .upload_u32(
                "buckets",
                &emb::bucket_tokens(&tokens, vp),
                &[emb::embedding_buckets_len(b * t)],
            )
            .unwrap();
        // Uneven pieces, one of a single row and one no token falls in.
        let cuts = [0, 7, 8, 100, 299, 300];
        let out = poisoned("out", &[b, t, c], DType::F32);
        let mut want_out = vec![0.0; b * t * c];
        let mut stored = Vec::new();
        let mut dispatches = Vec::new();
        let mut grads = Vec::new();
        for w in cuts.windows(2) {
            let (r0, r1) = (w[0], w[1]);
            let (piece, values) = upload("wte piece", &wte[r0 * c..r1 * c], &[r1 - r0, c], dtype);
            stored.extend(values);
            let at = emb::TablePiece {
                first: r0,
                total: vp,
            };
            let grad = gpu()
                .zeros("dwte piece", &[r1 - r0, c], DType::F32)
                .unwrap();
            dispatches.push(
                emb::embedding_forward(
                    gpu(),
                    &emb::EmbeddingForward {
                        out: &out,
                        tokens: &tt,
                        wte: &piece,
                        piece: at,
                        wpe: &wpe_g,
                        b,
                        t,
                    },
                )
                .unwrap(),
            );
            dispatches.push(
                emb::embedding_backward_wte(
                    gpu(),
                    &emb::EmbeddingBackwardWte {
                        dwte: &grad,
                        piece: at,
                        dout: &dout_g,
                        buckets: &buckets,
                        b,
                        t,
                    },
                )
                .unwrap(),
            );
            grads.push(grad);
        }
        gpu().run(&dispatches.iter().collect::<Vec<_>>()).unwrap();
        cpu::embedding_forward(&mut want_out, &tokens, &stored, &wpe, t, c);
        assert_close(
            &format!("forward over pieces, {dtype:?}"),
            &read(&out),
            &want_out,
            1e-6,
        );
        let got: Vec<f32> = grads.iter().flat_map(read).collect();
        let (mut want_wte, mut want_wpe) = (vec![0.0; vp * c], vec![0.0; block * c]);
        cpu::embedding_backward(&mut want_wte, &mut want_wpe, &dout, &tokens, t, c);
        assert_close(
            &format!("dwte over pieces, {dtype:?}"),
            &got,
            &want_wte,
            1e-6,
        );
    }
}
