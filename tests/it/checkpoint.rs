//! Checkpoint save/load and Hugging Face export/import round trips, and damaged files.

use std::path::PathBuf;
use wgpt::checkpoint::{self, hf, Checkpoint, TrainState};
use wgpt::model::init::init_params;
use wgpt::model::{BlockTensor, GptConfig, ParamId, ParamLayout};
use wgpt::rng::Rng;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        block_size: 12,
        vocab_size: 50,
        padded_vocab_size: 128,
    }
}

fn sample(cfg: &GptConfig) -> Checkpoint {
    let layout = ParamLayout::new(cfg);
    let mut rng = Rng::new(4);
    let params = init_params(cfg, &layout, 11);
    // Moments are only meaningful inside tensors; the padding between them stays zero.
    let mut m = vec![0f32; layout.total];
    let mut v = vec![0f32; layout.total];
    for (_, e) in layout.entries.iter() {
        m[e.range()].copy_from_slice(&rng.vec_normal(e.len(), 1.0));
        v[e.range()].copy_from_slice(&rng.vec_uniform(e.len(), 0.0, 1.0));
    }
    Checkpoint {
        config: *cfg,
        params,
        moments: Some((m, v)),
        state: Some(TrainState {
            step: 7,
            adam_t: 6,
            loader_position: 1234,
            loader_epoch: 3,
            rng_state: [1, 2, u64::MAX, 4],
            loss_scale: 32768.0,
            clean_steps: 5,
            settings: "{\"b\":4}".into(),
        }),
    }
}

#[test]
fn checkpoint_round_trips_exactly() {
    let dir = tmpdir("rt");
    let c = sample(&small());
    let path = checkpoint::checkpoint_path(&dir, 7);
    c.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.config, c.config);
    assert!(
        back.params == c.params,
        "parameters differ after the round trip"
    );
    assert!(
        back.moments == c.moments,
        "moments differ after the round trip"
    );
    assert_eq!(back.state, c.state);
    // no temporary file left behind
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn newest_complete_checkpoint_wins() {
    let dir = tmpdir("newest");
    let c = sample(&small());
    c.save(&checkpoint::checkpoint_path(&dir, 3)).unwrap();
    c.save(&checkpoint::checkpoint_path(&dir, 5)).unwrap();
    // a damaged newer one (truncated) must be skipped
    let bytes = std::fs::read(checkpoint::checkpoint_path(&dir, 5)).unwrap();
    std::fs::write(
        checkpoint::checkpoint_path(&dir, 9),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let (path, _) = checkpoint::load_newest(&dir).unwrap();
    assert_eq!(path, checkpoint::checkpoint_path(&dir, 5));
}

#[test]
fn hf_export_then_import_is_bit_exact() {
    let dir = tmpdir("hf");
    let c = sample(&small());
    hf::export(&dir, &c.config, &c.params).unwrap();
    let back = hf::import(&dir).unwrap();
    assert_eq!(back.config, c.config);
    assert_eq!(back.params, c.params);
    // The file is Hugging Face's layout: Conv1D [in, out], no padded rows, format=pt.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("h.0.attn.c_attn.weight").unwrap().shape(),
        &[16, 48]
    );
    assert_eq!(st.tensor("wte.weight").unwrap().shape(), &[50, 16]);
    assert!(st.tensor("lm_head.weight").is_err());
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(md.metadata().as_ref().unwrap().get("format").unwrap(), "pt");
    // the Conv1D transpose: element [i, o] of the file is our [o, i]
    let layout = ParamLayout::new(&c.config);
    let e = layout.entry(ParamId::Block(1, BlockTensor::CFcWeight));
    let t: Vec<f32> =
        bytemuck::pod_collect_to_vec(st.tensor("h.1.mlp.c_fc.weight").unwrap().data());
    assert_eq!(t[3 * 64 + 5], c.params[e.offset + 5 * 16 + 3]);
}

#[test]
fn damaged_files_give_errors_naming_the_problem() {
    let dir = tmpdir("bad");
    let c = sample(&small());
    let path = dir.join("c.safetensors");
    c.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() - 100].to_vec(), "truncated"),
        ("tiny", good[..5].to_vec(), "safetensors"),
        (
            "lying header length",
            {
                let mut b = good.clone();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "safetensors",
        ),
    ];
    for (name, bytes, want) in cases {
        std::fs::write(&path, bytes).unwrap();
        let e = Checkpoint::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains("c.safetensors"),
            "{name}: {e}"
        );
    }
    // a Hugging Face folder with a missing tensor and with a malformed config
    let hfdir = dir.join("hf");
    hf::export(&hfdir, &c.config, &c.params).unwrap();
    std::fs::write(
        hfdir.join("config.json"),
        "{\"n_layer\": 3, \"n_head\": 2, \"n_embd\": 16, \"n_positions\": 12, \"vocab_size\": 50}",
    )
    .unwrap();
    let e = hf::import(&hfdir).unwrap_err().to_string();
    assert!(e.contains("missing tensor 'h.2."), "{e}");
    std::fs::write(hfdir.join("config.json"), "{\"n_layer\": 2,").unwrap();
    assert!(hf::import(&hfdir)
        .unwrap_err()
        .to_string()
        .contains("malformed JSON"));
    std::fs::write(
        hfdir.join("config.json"),
        "{\"n_layer\": 2, \"n_head\": 3, \"n_embd\": 16, \"n_positions\": 12, \"vocab_size\": 50}",
    )
    .unwrap();
    assert!(hf::import(&hfdir)
        .unwrap_err()
        .to_string()
        .contains("divisible"));
}

#[test]
fn init_from_accepts_each_kind_and_names_what_is_wrong() {
    let dir = tmpdir("any");
    let c = sample(&small());
    // Our checkpoint file, and the folder that holds it.
    let ckdir = dir.join("run");
    std::fs::create_dir_all(&ckdir).unwrap();
    let ck = checkpoint::checkpoint_path(&ckdir, 4);
    c.save(&ck).unwrap();
    assert_eq!(hf::load_any(&ck).unwrap().params, c.params);
    assert_eq!(hf::load_any(&ckdir).unwrap().params, c.params);
    // A Hugging Face folder, and its model.safetensors named directly.
    let hfdir = dir.join("hf");
    hf::export(&hfdir, &c.config, &c.params).unwrap();
    let model = hfdir.join("model.safetensors");
    assert_eq!(hf::load_any(&hfdir).unwrap().params, c.params);
    assert_eq!(hf::load_any(&model).unwrap().params, c.params);

    // A truncated file is reported as damaged, not as a Hugging Face file missing its config.
    let bytes = std::fs::read(&ck).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let e = hf::load_any(&cut).unwrap_err().to_string();
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A Hugging Face file whose config.json is not beside it.
    let alone = dir.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(&model, alone.join("weights.safetensors")).unwrap();
    let e = hf::load_any(&alone.join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("same folder"),
        "{e}"
    );
    // A checkpoint folder whose only checkpoint is damaged says why it could not be read.
    std::fs::write(&ck, &bytes[..bytes.len() - 64]).unwrap();
    let e = hf::load_any(&ckdir).unwrap_err().to_string();
    assert!(e.contains("ckpt_step") && e.contains("truncated"), "{e}");
    // An empty folder: neither kind.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = hf::load_any(&empty).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn pruning_keeps_the_newest_and_the_protected() {
    let dir = tmpdir("prune");
    let c = sample(&small());
    for step in [2, 4, 6, 8, 10] {
        c.save(&checkpoint::checkpoint_path(&dir, step)).unwrap();
    }
    let other = dir.join("notes.txt");
    std::fs::write(&other, "not a checkpoint").unwrap();
    let resumed = checkpoint::checkpoint_path(&dir, 2);
    let removed = checkpoint::prune(&dir, 2, &[resumed.as_path()]).unwrap();
    assert_eq!(
        removed,
        [6, 4].map(|s| checkpoint::checkpoint_path(&dir, s))
    );
    let left: Vec<usize> = checkpoint::list_checkpoints(&dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left, [10, 8, 2]);
    assert!(other.exists(), "files that are not checkpoints stay");
    // keep = 0 keeps everything
    assert!(checkpoint::prune(&dir, 0, &[]).unwrap().is_empty());
    assert_eq!(checkpoint::list_checkpoints(&dir).unwrap().len(), 3);
}

#[test]
fn a_folder_that_cannot_hold_checkpoints_is_refused() {
    let dir = tmpdir("unwritable");
    // A folder below a regular file cannot be created, whoever runs the test.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let e = checkpoint::check_writable(&file.join("ck"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("checkpoints cannot be written here"), "{e}");
    assert!(e.contains("a-file"), "{e}");
    // A writable one is created and left empty.
    let ok = dir.join("new").join("ck");
    checkpoint::check_writable(&ok).unwrap();
    assert_eq!(std::fs::read_dir(&ok).unwrap().count(), 0);
}
