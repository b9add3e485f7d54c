//! Drawing: the top bar, the error bar, and the Train and Generate tabs.

use crate::app::{PathField, RunStatus, Tab, WgptApp};
use crate::forms::{GenSourceChoice, InitChoice, Preset};
use egui::{Color32, RichText, Ui};
use egui_extras::{Column, TableBuilder};
use egui_plot::{Line, Plot, Points};
use wgpt::train::settings::{AttentionKind, Precision};

/// A label and a widget on one grid row, the widget named by the label for screen readers
/// (and for the UI tests, which find widgets by these names).
fn row(ui: &mut Ui, label: &str, add: impl FnOnce(&mut Ui) -> egui::Response) {
    let l = ui.label(label);
    add(ui).labelled_by(l.id);
    ui.end_row();
}

/// A grid row for "every N steps" (0: off).
fn every_row(ui: &mut Ui, label: &str, steps: &mut usize, hint: &str) {
    row(ui, label, |ui| {
        ui.add(
            egui::DragValue::new(steps)
                .range(0..=1_000_000)
                .suffix(" steps"),
        )
        .on_hover_text(hint)
    });
}

fn path_row(
    app: &mut WgptApp,
    ui: &mut Ui,
    label: &str,
    field: PathField,
    folder: bool,
    enabled: bool,
) {
    let l = ui.label(label);
    ui.horizontal(|ui| {
        let text = match field {
            PathField::Data => &mut app.train.data_path,
            PathField::Init => &mut app.train.init_path,
            PathField::CheckpointDir => &mut app.train.checkpoint_dir,
            PathField::GenWeights => &mut app.gen.path,
        };
        ui.add_enabled(
            enabled,
            egui::TextEdit::singleline(text).desired_width(190.0),
        )
        .labelled_by(l.id);
        let browse = ui
            .add_enabled(enabled && !app.dialog_open, egui::Button::new("Browse…"))
            .on_hover_text("Open a file dialog (needs an XDG desktop portal on Linux)");
        if browse.clicked() {
            app.browse(field, folder);
        }
    });
    ui.end_row();
}

pub fn top_bar(app: &mut WgptApp, ui: &mut Ui) {
    egui::Panel::top("top bar").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.heading("wgpt");
            ui.separator();
            ui.selectable_value(&mut app.tab, Tab::Train, "Train");
            ui.selectable_value(&mut app.tab, Tab::Generate, "Generate");
            ui.separator();
            let status = app.status.describe();
            ui.label(format!("Run: {status}"));
            if app.gen_view.running {
                ui.separator();
                ui.spinner();
                ui.label("generating");
            }
        });
        ui.label(
            RichText::new(app.gpu.summary())
                .small()
                .color(ui.visuals().weak_text_color()),
        );
    });
}

pub fn error_bar(app: &mut WgptApp, ui: &mut Ui) {
    if app.errors.is_empty() {
        return;
    }
    egui::Panel::top("errors").show(ui, |ui| {
        let color = ui.visuals().error_fg_color;
        let mut dismiss = false;
        for e in app.errors.iter().rev().take(3) {
            ui.label(RichText::new(format!("Error: {e}")).color(color));
        }
        if app.errors.len() > 3 {
            ui.label(format!(
                "(and {} earlier errors in the log)",
                app.errors.len() - 3
            ));
        }
        if ui.button("Dismiss errors").clicked() {
            dismiss = true;
        }
        if dismiss {
            app.errors.clear();
        }
    });
}

fn train_settings(app: &mut WgptApp, ui: &mut Ui) {
    let editable = !app.status.is_active();
    let has_f16 = app.gpu.has_f16();
    ui.add_enabled_ui(editable, |ui| {
        ui.heading("Model");
        egui::Grid::new("model").num_columns(2).show(ui, |ui| {
            let l = ui.label("Preset");
            let mut preset = app.train.preset;
            egui::ComboBox::from_id_salt("preset")
                .selected_text(preset.name())
                .show_ui(ui, |ui| {
                    for p in Preset::ALL {
                        ui.selectable_value(&mut preset, p, p.name());
                    }
                })
                .response
                .labelled_by(l.id);
            if preset != app.train.preset {
                app.train.apply_preset(preset);
            }
            ui.end_row();
            let before = (
                app.train.n_layer,
                app.train.n_head,
                app.train.n_embd,
                app.train.block_size,
            );
            let t = &mut app.train;
            row(ui, "Layers", |ui| {
                ui.add(egui::DragValue::new(&mut t.n_layer).range(1..=48))
            });
            row(ui, "Heads", |ui| {
                ui.add(egui::DragValue::new(&mut t.n_head).range(1..=64))
            });
            row(ui, "Embedding", |ui| {
                ui.add(egui::DragValue::new(&mut t.n_embd).range(1..=4096))
            });
            row(ui, "Block size", |ui| {
                ui.add(egui::DragValue::new(&mut t.block_size).range(1..=4096))
            });
            if before != (t.n_layer, t.n_head, t.n_embd, t.block_size) {
                t.preset = Preset::Custom;
            }
        });
        ui.label(
            RichText::new("Vocabulary: GPT-2's 50257 tokens (50304 in memory)")
                .small()
                .color(ui.visuals().weak_text_color()),
        );

        ui.separator();
        ui.heading("Hyperparameters");
        egui::Grid::new("hyper").num_columns(2).show(ui, |ui| {
            let t = &mut app.train;
            row(ui, "Batch size (B)", |ui| {
                ui.add(egui::DragValue::new(&mut t.batch_size).range(1..=512))
            });
            row(ui, "Sequence length (T)", |ui| {
                ui.add(egui::DragValue::new(&mut t.seq_len).range(1..=4096))
            });
            row(ui, "Steps", |ui| {
                ui.add(egui::DragValue::new(&mut t.steps).range(1..=1_000_000))
            });
            row(ui, "Max learning rate", |ui| {
                ui.add(
                    egui::DragValue::new(&mut t.max_lr)
                        .range(0.0..=1.0)
                        .speed(1e-5)
                        .custom_formatter(|v, _| format!("{v:.2e}"))
                        .custom_parser(|s| s.trim().parse::<f64>().ok()),
                )
            });
            row(ui, "Warmup steps", |ui| {
                ui.add(egui::DragValue::new(&mut t.warmup_steps).range(0..=1_000_000))
            });
            row(ui, "Weight decay", |ui| {
                ui.add(
                    egui::DragValue::new(&mut t.weight_decay)
                        .range(0.0..=10.0)
                        .speed(0.01),
                )
            });
            row(ui, "Gradient clip", |ui| {
                ui.add(
                    egui::DragValue::new(&mut t.grad_clip)
                        .range(0.0..=100.0)
                        .speed(0.05),
                )
            });
            row(ui, "Seed", |ui| ui.add(egui::DragValue::new(&mut t.seed)));
            let l = ui.label("Precision");
            ui.horizontal(|ui| {
                ui.radio_value(&mut t.precision, Precision::F32, "f32");
                ui.add_enabled_ui(has_f16, |ui| {
                    ui.radio_value(&mut t.precision, Precision::F16, "f16")
                        .on_disabled_hover_text("the adapter lacks SHADER_F16");
                });
            })
            .response
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Attention");
            ui.horizontal(|ui| {
                ui.radio_value(&mut t.attention, AttentionKind::Flash, "flash");
                ui.radio_value(&mut t.attention, AttentionKind::Naive, "naive");
            })
            .response
            .labelled_by(l.id);
            ui.end_row();
        });

        ui.separator();
        ui.heading("Data and weights");
        egui::Grid::new("files").num_columns(2).show(ui, |ui| {
            path_row(app, ui, "Data file or folder", PathField::Data, false, true);
            row(ui, "Shuffle", |ui| {
                ui.checkbox(&mut app.train.shuffle, "shards and documents per epoch")
            });
            let l = ui.label("Start from");
            ui.vertical(|ui| {
                let i = &mut app.train.init;
                ui.radio_value(i, InitChoice::Scratch, "Scratch (seeded init)");
                ui.radio_value(i, InitChoice::Checkpoint, "Checkpoint (resumes its run)");
                ui.radio_value(i, InitChoice::HuggingFace, "Hugging Face GPT-2 folder");
            })
            .response
            .labelled_by(l.id);
            ui.end_row();
            let needs_path = app.train.init != InitChoice::Scratch;
            let folder = app.train.init == InitChoice::HuggingFace;
            path_row(app, ui, "Weights path", PathField::Init, folder, needs_path);
            path_row(
                app,
                ui,
                "Checkpoint folder",
                PathField::CheckpointDir,
                true,
                true,
            );
        });
        ui.separator();
        ui.heading("During training");
        egui::Grid::new("evaluation").num_columns(2).show(ui, |ui| {
            let t = &mut app.train;
            every_row(
                ui,
                "Validate every",
                &mut t.val_every,
                "0: off. Needs a shard folder (its first shard is the validation split).",
            );
            every_row(
                ui,
                "Sample every",
                &mut t.sample_every,
                "0: off. 4 samples of 32 tokens after \"Hello, I'm a language model,\"",
            );
        });
        if app.train.init != InitChoice::Scratch {
            ui.label(
                RichText::new("The model's shape is taken from the weights.")
                    .small()
                    .color(ui.visuals().weak_text_color()),
            );
        }
    });
}

fn controls(app: &mut WgptApp, ui: &mut Ui) {
    ui.horizontal(|ui| {
        let s = app.status.clone();
        let can_start = !s.is_active();
        if ui
            .add_enabled(can_start, egui::Button::new("Start"))
            .clicked()
        {
            app.start_run();
        }
        if ui
            .add_enabled(s == RunStatus::Running, egui::Button::new("Pause"))
            .clicked()
        {
            app.pause();
        }
        if ui
            .add_enabled(s == RunStatus::Paused, egui::Button::new("Resume"))
            .clicked()
        {
            app.resume();
        }
        let can_stop = matches!(
            s,
            RunStatus::Running | RunStatus::Paused | RunStatus::Pausing
        );
        if ui
            .add_enabled(can_stop, egui::Button::new("Stop"))
            .on_hover_text("Save a checkpoint at the end of the current step and end the run")
            .clicked()
        {
            app.stop();
        }
        if matches!(
            s,
            RunStatus::Starting | RunStatus::Pausing | RunStatus::Stopping
        ) {
            ui.spinner();
        }
        ui.label(format!("Status: {}", s.describe()));
    });
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn progress(app: &WgptApp, ui: &mut Ui) {
    let r = &app.run;
    let (done, total) = (r.steps_done(), r.total_steps());
    ui.label(format!("Steps done: {done} / {total}"));
    let frac = if total > 0 {
        done as f32 / total as f32
    } else {
        0.0
    };
    let eta = match r.eta_secs() {
        Some(s)
            if matches!(app.status, RunStatus::Running | RunStatus::Pausing) && done < total =>
        {
            format!(", ETA {}", fmt_secs(s))
        }
        Some(_) if app.status == RunStatus::Paused && done < total => ", paused".to_string(),
        _ => String::new(),
    };
    let text = if r.settings.is_some() {
        format!("step {done} of {total}{eta}")
    } else {
        "no run yet".to_string()
    };
    ui.add(egui::ProgressBar::new(frac).text(text));
    if let Some(s) = &r.settings {
        ui.label(
            RichText::new(format!(
                "{} | {} parameters | {} tokens of data | B {} T {} | {} | attention {}",
                s.config.describe(),
                r.params,
                r.tokens,
                s.batch_size,
                s.seq_len,
                s.precision,
                s.attention
            ))
            .small(),
        );
    }
    if let Some(p) = &r.last_saved {
        ui.label(RichText::new(format!("Last checkpoint: {}", p.display())).small());
    }
}

fn metric_plot(ui: &mut Ui, title: &str, color: Color32, points: Vec<[f64; 2]>, height: f32) {
    let last = points
        .last()
        .map(|p| format!(", last {}", format_metric(p[1])))
        .unwrap_or_default();
    ui.label(format!("{title}: {} points{last}", points.len()));
    let few = points.len() < 60;
    Plot::new(title)
        .height(height)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_drag(false)
        .x_axis_label("step")
        .show(ui, |p| {
            if few {
                p.points(Points::new(title, points.clone()).radius(2.5).color(color));
            }
            p.line(Line::new(title, points).color(color));
        });
}

fn format_metric(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// The loss plot: the training loss (raw, faint, and smoothed), the validation loss, and the
/// smoothing and log-scale controls.
fn loss_plot(app: &mut WgptApp, ui: &mut Ui, height: f32) {
    let steps = &app.run.steps;
    let o = app.plot;
    let axis = |v: f64| if o.log_scale { v.log10() } else { v };
    let raw: Vec<f64> = steps.iter().map(|s| s.loss as f64).collect();
    let smoothed = crate::app::smooth(&raw, o.smoothing);
    let at = |i: usize| steps[i].step as f64;
    let train: Vec<[f64; 2]> = (0..raw.len()).map(|i| [at(i), axis(smoothed[i])]).collect();
    let faint: Vec<[f64; 2]> = (0..raw.len()).map(|i| [at(i), axis(raw[i])]).collect();
    let val: Vec<[f64; 2]> = app
        .run
        .val
        .iter()
        .map(|&(step, l)| [step as f64, axis(l)])
        .collect();
    let last = raw
        .last()
        .map(|&l| format!(", last {}", format_metric(l)))
        .unwrap_or_default();
    let last_val = app
        .run
        .val
        .last()
        .map(|&(_, l)| format!(", val {}", format_metric(l)))
        .unwrap_or_default();
    ui.label(format!("Loss: {} points{last}{last_val}", raw.len()));
    // Kept narrow: the plot below takes the width of its column.
    ui.horizontal(|ui| {
        ui.spacing_mut().slider_width = 90.0;
        ui.add(
            egui::Slider::new(&mut app.plot.smoothing, 0.0..=0.99)
                .text("smoothing")
                .fixed_decimals(2),
        );
        ui.checkbox(&mut app.plot.log_scale, "log scale");
    });
    let color = Color32::from_rgb(230, 120, 60);
    Plot::new("Loss")
        .height(height)
        .allow_scroll(false)
        .allow_zoom(false)
        .allow_drag(false)
        .x_axis_label("step")
        .y_axis_label(if o.log_scale { "log10 loss" } else { "loss" })
        .legend(egui_plot::Legend::default().position(egui_plot::Corner::RightTop))
        .show(ui, |p| {
            if o.smoothing > 0.0 {
                p.line(Line::new("train (raw)", faint).color(color.gamma_multiply(0.3)));
            }
            p.line(Line::new("train", train).color(color));
            if !val.is_empty() {
                let blue = Color32::from_rgb(70, 140, 240);
                p.points(Points::new("val", val.clone()).radius(3.0).color(blue));
                p.line(Line::new("val", val).color(blue));
            }
        });
}

fn plots(app: &mut WgptApp, ui: &mut Ui, height: f32) {
    let series = |app: &WgptApp, f: fn(&wgpt::train::trainer::StepStats) -> f64| -> Vec<[f64; 2]> {
        app.run
            .steps
            .iter()
            .map(|s| [s.step as f64, f(s)])
            .collect()
    };
    let (lr, norm, tps) = (
        series(app, |s| s.lr),
        series(app, |s| s.norm as f64),
        series(app, |s| s.tok_per_sec),
    );
    ui.columns(2, |cols| {
        loss_plot(app, &mut cols[0], height);
        metric_plot(
            &mut cols[1],
            "Learning rate",
            Color32::from_rgb(90, 160, 230),
            lr,
            height,
        );
    });
    ui.columns(2, |cols| {
        metric_plot(
            &mut cols[0],
            "Gradient norm",
            Color32::from_rgb(120, 200, 110),
            norm,
            height,
        );
        metric_plot(
            &mut cols[1],
            "Tokens per second",
            Color32::from_rgb(200, 120, 210),
            tps,
            height,
        );
    });
}

/// Samples taken during training, newest first.
fn samples_panel(app: &WgptApp, ui: &mut Ui) {
    if app.run.samples.is_empty() {
        return;
    }
    egui::CollapsingHeader::new(format!(
        "Samples during training ({})",
        app.run.samples.len()
    ))
    .default_open(true)
    .show(ui, |ui| {
        egui::ScrollArea::vertical()
            .id_salt("training samples")
            .max_height(140.0)
            .show(ui, |ui| {
                for (step, texts) in app.run.samples.iter().rev() {
                    ui.strong(format!("after step {step}"));
                    for t in texts {
                        ui.label(RichText::new(t).monospace());
                    }
                }
            });
    });
}

fn step_table(app: &WgptApp, ui: &mut Ui) {
    let steps = &app.run.steps;
    TableBuilder::new(ui)
        .id_salt("step log")
        .striped(true)
        .stick_to_bottom(true)
        .column(Column::exact(50.0))
        .column(Column::exact(80.0))
        .column(Column::exact(85.0))
        .column(Column::exact(70.0))
        .column(Column::exact(85.0))
        .column(Column::remainder())
        .header(18.0, |mut h| {
            for name in ["step", "loss", "lr", "norm", "dt (ms)", "tok/sec"] {
                h.col(|ui| {
                    ui.strong(name);
                });
            }
        })
        .body(|body| {
            body.rows(16.0, steps.len(), |mut r| {
                let s = &steps[r.index()];
                let cells = [
                    s.step.to_string(),
                    if s.skipped {
                        format!("{:.6} (skipped)", s.loss)
                    } else {
                        format!("{:.6}", s.loss)
                    },
                    format!("{:.4e}", s.lr),
                    format!("{:.4}", s.norm),
                    format!("{:.2}", s.dt_ms),
                    format!("{:.1}", s.tok_per_sec),
                ];
                for c in cells {
                    r.col(|ui| {
                        ui.monospace(c);
                    });
                }
            });
        });
}

fn adapter_details(app: &WgptApp, ui: &mut Ui) {
    let g = &app.gpu;
    egui::CollapsingHeader::new("Adapter")
        .default_open(false)
        .show(ui, |ui| {
            ui.label(format!(
                "{} ({:?}, {:?})",
                g.info.name, g.info.backend, g.info.device_type
            ));
            ui.label(format!("driver: {} {}", g.info.driver, g.info.driver_info));
            ui.label(format!("features in use: {}", g.feature_list()));
            ui.label(format!(
                "max buffer {} MiB | max storage binding {} MiB | max workgroups per dimension {}",
                g.limits.max_buffer_size >> 20,
                g.limits.max_storage_buffer_binding_size >> 20,
                g.limits.max_compute_workgroups_per_dimension
            ));
        });
}

pub fn train_tab(app: &mut WgptApp, ui: &mut Ui) {
    egui::Panel::left("train settings")
        .resizable(true)
        .default_size(340.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                train_settings(app, ui);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        controls(app, ui);
        progress(app, ui);
        adapter_details(app, ui);
        ui.separator();
        let avail = ui.available_height();
        let plot_h = ((avail - 260.0) / 2.0 - 24.0).clamp(80.0, 260.0);
        plots(app, ui, plot_h);
        samples_panel(app, ui);
        ui.separator();
        ui.label("Step log");
        step_table(app, ui);
    });
}

pub fn generate_tab(app: &mut WgptApp, ui: &mut Ui) {
    egui::Panel::left("generate settings")
        .resizable(true)
        .default_size(340.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                generate_settings(app, ui);
            });
        });
    egui::CentralPanel::default().show(ui, |ui| {
        let v = &app.gen_view;
        ui.horizontal(|ui| {
            if v.running {
                ui.spinner();
            }
            let rate = match v.tokens_per_sec() {
                Some(r) => format!("{r:.1} tokens/s"),
                None => "-".into(),
            };
            let count = v.done.map_or(v.tokens, |(n, _)| n);
            ui.label(format!("Tokens generated: {count} | Speed: {rate}"));
        });
        ui.separator();
        egui::ScrollArea::vertical().show(ui, |ui| {
            for (i, text) in v.texts.iter().enumerate() {
                ui.label(RichText::new(format!("Sample {}", i + 1)).strong());
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    ui.label(RichText::new(text).monospace());
                });
                ui.add_space(6.0);
            }
            if v.texts.is_empty() && !v.running {
                ui.label("Press Generate text to sample.");
            }
        });
    });
}

fn generate_settings(app: &mut WgptApp, ui: &mut Ui) {
    ui.heading("Weights");
    let run_ok = app.run.weights_loaded;
    let run_label = match &app.status {
        RunStatus::Running | RunStatus::Pausing => {
            "The run in progress (samples between steps)".to_string()
        }
        RunStatus::Paused => "The paused run".to_string(),
        _ if run_ok => "The last run's weights".to_string(),
        _ => "The run (none loaded)".to_string(),
    };
    ui.add_enabled_ui(!app.gen_view.running, |ui| {
        ui.add_enabled_ui(run_ok, |ui| {
            ui.radio_value(&mut app.gen.source, GenSourceChoice::Run, run_label);
        });
        ui.radio_value(
            &mut app.gen.source,
            GenSourceChoice::File,
            "A checkpoint or Hugging Face folder",
        );
        egui::Grid::new("gen files").num_columns(2).show(ui, |ui| {
            let file = app.gen.source == GenSourceChoice::File;
            path_row(app, ui, "Weights file", PathField::GenWeights, false, file);
        });
        ui.separator();
        ui.heading("Sampling");
        let l = ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut app.gen.prompt)
                .desired_rows(3)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(l.id);
        egui::Grid::new("sampling").num_columns(2).show(ui, |ui| {
            let g = &mut app.gen;
            row(ui, "Max new tokens", |ui| {
                ui.add(egui::DragValue::new(&mut g.max_tokens).range(1..=4096))
            });
            row(ui, "Top-k", |ui| {
                ui.add(egui::DragValue::new(&mut g.top_k).range(1..=50257))
            });
            row(ui, "Temperature", |ui| {
                ui.add(
                    egui::DragValue::new(&mut g.temperature)
                        .range(0.01..=10.0)
                        .speed(0.01),
                )
            });
            row(ui, "Samples", |ui| {
                ui.add(egui::DragValue::new(&mut g.samples).range(1..=64))
            });
            row(ui, "Sampling seed", |ui| {
                ui.add(egui::DragValue::new(&mut g.seed))
            });
        });
    });
    ui.add_space(8.0);
    let can = !app.gen_view.running;
    if ui
        .add_enabled(can, egui::Button::new("Generate text"))
        .clicked()
    {
        app.generate();
    }
    if matches!(app.status, RunStatus::Running) && app.gen.source == GenSourceChoice::Run {
        ui.label(
            RichText::new("Training waits while samples are drawn.")
                .small()
                .color(ui.visuals().weak_text_color()),
        );
    }
}
