//! The app's state and its frame: events from the engine thread are folded into the state,
//! then the Train or Generate panel is drawn. Nothing here waits on the GPU.

use crate::forms::{GenForm, GenSourceChoice, TrainForm};
use crate::worker::{Command, Event, Notify, Worker};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use wgpt::gpu::Gpu;
use wgpt::train::settings::TrainSettings;
use wgpt::train::trainer::StepStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tab {
    Train,
    Generate,
}

/// Where the run stands, as far as the window knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Idle,
    /// Start sent; loading data and building the step.
    Starting,
    Running,
    /// Pause sent; it takes effect when the current step ends.
    Pausing,
    Paused,
    /// Stop sent; the checkpoint is written when the current step ends.
    Stopping,
    /// Finished or stopped (or failed), with the reason.
    Ended(String),
}

impl RunStatus {
    /// A run whose trainer may still step.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            RunStatus::Starting
                | RunStatus::Running
                | RunStatus::Pausing
                | RunStatus::Paused
                | RunStatus::Stopping
        )
    }

    pub fn describe(&self) -> String {
        match self {
            RunStatus::Idle => "idle".into(),
            RunStatus::Starting => "starting".into(),
            RunStatus::Running => "training".into(),
            RunStatus::Pausing => "pausing at the end of this step".into(),
            RunStatus::Paused => "paused".into(),
            RunStatus::Stopping => "stopping: saving at the end of this step".into(),
            RunStatus::Ended(why) => why.clone(),
        }
    }
}

/// What the window shows of the current run.
#[derive(Default)]
pub struct RunView {
    pub settings: Option<TrainSettings>,
    pub tokens: usize,
    pub params: usize,
    pub start_step: usize,
    pub steps: Vec<StepStats>,
    /// (step, validation loss).
    pub val: Vec<(usize, f64)>,
    /// Samples during training: (step, texts), oldest first.
    pub samples: Vec<(usize, Vec<String>)>,
    pub last_saved: Option<PathBuf>,
    /// Whether the engine holds this run's weights (to sample from).
    pub weights_loaded: bool,
}

impl RunView {
    /// Optimiser steps completed (including those of a resumed checkpoint).
    pub fn steps_done(&self) -> usize {
        self.steps.last().map_or(self.start_step, |s| s.step + 1)
    }

    pub fn total_steps(&self) -> usize {
        self.settings.as_ref().map_or(0, |s| s.steps)
    }

    /// Seconds left, from the mean duration of the last few steps.
    pub fn eta_secs(&self) -> Option<f64> {
        let recent: Vec<f64> = self.steps.iter().rev().take(10).map(|s| s.dt_ms).collect();
        if recent.is_empty() {
            return None;
        }
        let mean = recent.iter().sum::<f64>() / recent.len() as f64 / 1e3;
        let left = self.total_steps().saturating_sub(self.steps_done());
        Some(mean * left as f64)
    }
}

/// How the loss plot is drawn: TensorBoard's smoothing (an exponential moving average with a
/// debiased start) and a logarithmic loss axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlotOptions {
    /// 0: raw values; up to 0.999.
    pub smoothing: f64,
    pub log_scale: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            smoothing: 0.6,
            log_scale: false,
        }
    }
}

/// TensorBoard's smoothing of `values`: an exponential moving average with weight `w` on the
/// past, divided by `1 - w^n` so that the first points are not pulled towards 0; non-finite
/// values are passed through and left out of the average.
pub fn smooth(values: &[f64], w: f64) -> Vec<f64> {
    let mut last = 0.0;
    let mut n = 0;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            last = last * w + (1.0 - w) * v;
            n += 1;
            let debias = 1.0 - w.powi(n);
            if debias > 0.0 {
                last / debias
            } else {
                v
            }
        })
        .collect()
}

/// The Generate panel's output.
#[derive(Default)]
pub struct GenView {
    pub running: bool,
    pub texts: Vec<String>,
    pub tokens: usize,
    pub started: Option<Instant>,
    /// Tokens and seconds of the last finished generation.
    pub done: Option<(usize, f64)>,
}

impl GenView {
    /// Tokens per second over all samples: final once done, live while running.
    pub fn tokens_per_sec(&self) -> Option<f64> {
        match (self.done, self.started) {
            (Some((n, secs)), _) if secs > 0.0 => Some(n as f64 / secs),
            (None, Some(t)) if self.tokens > 0 => {
                Some(self.tokens as f64 / t.elapsed().as_secs_f64().max(1e-6))
            }
            _ => None,
        }
    }
}

/// Which field a file dialog fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathField {
    Data,
    Init,
    CheckpointDir,
    GenWeights,
}

/// A file dialog's answer: the field it was opened for and the path picked, if any.
type DialogAnswer = (PathField, Option<PathBuf>);

pub struct WgptApp {
    pub(crate) gpu: Arc<Gpu>,
    worker: Worker,
    repaint: Arc<OnceLock<egui::Context>>,
    pub tab: Tab,
    pub train: TrainForm,
    pub gen: GenForm,
    pub status: RunStatus,
    pub run: RunView,
    pub gen_view: GenView,
    /// How the loss plot is drawn.
    pub plot: PlotOptions,
    /// Errors not yet dismissed, newest last.
    pub errors: Vec<String>,
    pub log: Vec<String>,
    /// The window was asked to close while a run was active: it closes once the checkpoint is
    /// written.
    closing: bool,
    dialogs: (Sender<DialogAnswer>, Receiver<DialogAnswer>),
    pub dialog_open: bool,
}

impl WgptApp {
    /// The app on `gpu` (the window's own device in the desktop app, any device in tests).
    pub fn new(gpu: Arc<Gpu>) -> WgptApp {
        let repaint: Arc<OnceLock<egui::Context>> = Arc::new(OnceLock::new());
        let r = repaint.clone();
        let notify: Notify = Arc::new(move || {
            if let Some(ctx) = r.get() {
                ctx.request_repaint();
            }
        });
        let worker = Worker::spawn(gpu.clone(), notify);
        let train = TrainForm::for_gpu(&gpu);
        WgptApp {
            gpu,
            worker,
            repaint,
            tab: Tab::Train,
            train,
            gen: GenForm::default(),
            status: RunStatus::Idle,
            run: RunView::default(),
            gen_view: GenView::default(),
            plot: PlotOptions::default(),
            errors: Vec::new(),
            log: Vec::new(),
            closing: false,
            dialogs: std::sync::mpsc::channel(),
            dialog_open: false,
        }
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Saves the run (if it has unsaved steps) and ends the engine thread; blocks until done.
    pub fn shutdown(&mut self) {
        self.worker.shutdown();
        for e in self.worker.poll() {
            self.handle_event(e);
        }
    }

    pub(crate) fn send(&self, c: Command) {
        self.worker.send(c);
    }

    pub(crate) fn report(&mut self, e: impl Into<String>) {
        let e = e.into();
        self.log.push(format!("error: {e}"));
        self.errors.push(e);
    }

    pub(crate) fn start_run(&mut self) {
        match self.train.run_request() {
            Ok(request) => {
                self.run = RunView::default();
                self.status = RunStatus::Starting;
                self.log.push(format!(
                    "starting: data {}, checkpoints in {}",
                    request.data.display(),
                    self.train.checkpoint_dir.trim()
                ));
                self.send(Command::Start(Box::new(request)));
            }
            Err(e) => self.report(e),
        }
    }

    pub(crate) fn pause(&mut self) {
        if self.status == RunStatus::Running {
            self.status = RunStatus::Pausing;
            self.send(Command::Pause);
        }
    }

    pub(crate) fn resume(&mut self) {
        if self.status == RunStatus::Paused {
            self.status = RunStatus::Running;
            self.send(Command::Resume);
        }
    }

    pub(crate) fn stop(&mut self) {
        if self.status.is_active() && self.status != RunStatus::Starting {
            self.status = RunStatus::Stopping;
            self.send(Command::Stop);
        }
    }

    pub(crate) fn generate(&mut self) {
        if self.gen_view.running {
            return;
        }
        match self.gen.gen_spec() {
            Ok(spec) => {
                if self.gen.source == GenSourceChoice::Run && !self.run.weights_loaded {
                    self.report(
                        "there is no run to sample from: start one, or choose a checkpoint file",
                    );
                    return;
                }
                self.gen_view = GenView {
                    running: true,
                    ..Default::default()
                };
                self.send(Command::Generate(spec));
            }
            Err(e) => self.report(e),
        }
    }

    /// Opens a native file dialog on its own thread; the answer arrives in a later frame.
    pub(crate) fn browse(&mut self, field: PathField, folder: bool) {
        if self.dialog_open {
            return;
        }
        self.dialog_open = true;
        let tx = self.dialogs.0.clone();
        let ctx = self.repaint.get().cloned();
        let spawned = std::thread::Builder::new()
            .name("file dialog".into())
            .spawn(move || {
                let d = rfd::FileDialog::new();
                let picked = if folder {
                    d.pick_folder()
                } else {
                    d.pick_file()
                };
                let _ = tx.send((field, picked));
                if let Some(c) = ctx {
                    c.request_repaint();
                }
            });
        if let Err(e) = spawned {
            self.dialog_open = false;
            self.report(format!("could not open a file dialog: {e}"));
        }
    }

    fn poll_dialogs(&mut self) {
        while let Ok((field, picked)) = self.dialogs.1.try_recv() {
            self.dialog_open = false;
            let Some(p) = picked else { continue };
            let s = p.display().to_string();
            match field {
                PathField::Data => self.train.data_path = s,
                PathField::Init => self.train.init_path = s,
                PathField::CheckpointDir => self.train.checkpoint_dir = s,
                PathField::GenWeights => self.gen.path = s,
            }
        }
    }

    fn handle_event(&mut self, e: Event) {
        match e {
            Event::Log(s) => self.log.push(s),
            Event::RunStarted {
                settings,
                tokens,
                params,
                start_step,
            } => {
                self.log.push(format!(
                    "run started: {} parameters, {} tokens, from step {start_step}",
                    params, tokens
                ));
                self.run = RunView {
                    settings: Some(*settings),
                    tokens,
                    params,
                    start_step,
                    weights_loaded: true,
                    ..Default::default()
                };
                // A Stop or Pause pressed while starting is still in flight.
                if self.status == RunStatus::Starting {
                    self.status = RunStatus::Running;
                }
                self.gen.source = GenSourceChoice::Run;
            }
            Event::Step(s) => {
                self.log.push(format!(
                    "step {:4} | loss: {:.6} | lr {:.4e} | norm: {:.4} | dt: {:.2}ms | tok/sec: {:.2}{}",
                    s.step,
                    s.loss,
                    s.lr,
                    s.norm,
                    s.dt_ms,
                    s.tok_per_sec,
                    if s.skipped { " | skipped (non-finite gradients)" } else { "" }
                ));
                self.run.steps.push(s);
            }
            Event::Val { step, loss } => {
                self.log
                    .push(format!("step {step:4} | val loss: {loss:.6}"));
                self.run.val.push((step, loss));
            }
            Event::Samples { step, texts } => {
                for (i, t) in texts.iter().enumerate() {
                    self.log.push(format!("step {step:4} | sample {i}: {t:?}"));
                }
                self.run.samples.push((step, texts));
            }
            Event::Paused => {
                if self.status.is_active() && self.status != RunStatus::Stopping {
                    self.status = RunStatus::Paused;
                }
            }
            Event::Resumed => {
                if self.status == RunStatus::Paused {
                    self.status = RunStatus::Running;
                }
            }
            Event::Saved(p) => {
                self.log.push(format!("saved {}", p.display()));
                self.run.last_saved = Some(p);
            }
            Event::RunEnded {
                reason,
                weights_kept,
            } => {
                self.log.push(format!("run {reason}"));
                self.status = RunStatus::Ended(reason);
                self.run.weights_loaded = weights_kept;
                if self.closing {
                    if let Some(ctx) = self.repaint.get() {
                        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                    }
                }
            }
            Event::Error(e) => self.report(e),
            Event::GenStarted { samples } => {
                self.gen_view.texts = vec![self.gen.prompt.clone(); samples];
                self.gen_view.started = Some(Instant::now());
            }
            Event::GenToken { sample, text } => {
                self.gen_view.tokens += 1;
                if let Some(t) = self.gen_view.texts.get_mut(sample) {
                    t.push_str(&text);
                }
            }
            Event::GenText { sample, text } => {
                if let Some(t) = self.gen_view.texts.get_mut(sample) {
                    t.push_str(&text);
                }
            }
            Event::GenDone { tokens, secs } => {
                self.gen_view.running = false;
                if tokens > 0 {
                    self.gen_view.done = Some((tokens, secs));
                    self.log.push(format!(
                        "generated {tokens} tokens in {secs:.2}s ({:.1} tokens/s)",
                        tokens as f64 / secs.max(1e-9)
                    ));
                }
            }
        }
    }

    /// One frame: take in the engine's news, then draw.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        let _ = self.repaint.set(ui.ctx().clone());
        for e in self.worker.poll() {
            self.handle_event(e);
        }
        self.poll_dialogs();

        if ui.input(|i| i.viewport().close_requested()) && self.status.is_active() {
            // Finish the step, save, then close (see `RunEnded`).
            ui.ctx()
                .send_viewport_cmd(egui::ViewportCommand::CancelClose);
            if !self.closing {
                self.closing = true;
                self.stop();
            }
        }

        crate::ui::top_bar(self, ui);
        crate::ui::error_bar(self, ui);
        match self.tab {
            Tab::Train => crate::ui::train_tab(self, ui),
            Tab::Generate => crate::ui::generate_tab(self, ui),
        }
        if self.gen_view.running || self.status.is_active() {
            // Live numbers (ETA, tokens/s) tick between events too.
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(250));
        }
    }
}

impl eframe::App for WgptApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn on_exit(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::smooth;

    #[test]
    fn smoothing_is_tensorboards_debiased_ema() {
        // A constant stays itself from the first point (the debiasing), NaN passes through
        // without entering the average, and w = 0 is the raw series.
        let s = smooth(&[2.0, 2.0, f64::NAN, 2.0], 0.9);
        assert!((s[0] - 2.0).abs() < 1e-12 && (s[1] - 2.0).abs() < 1e-12);
        assert!(s[2].is_nan() && (s[3] - 2.0).abs() < 1e-12);
        assert_eq!(smooth(&[1.0, 5.0, 3.0], 0.0), vec![1.0, 5.0, 3.0]);
        // By hand: last = 0.5 * 0 + 0.5 * 1 = 0.5, / (1 - 0.5) = 1; then 0.25 + 1.5 = 1.75,
        // / 0.75 = 2.3333.
        let s = smooth(&[1.0, 3.0], 0.5);
        assert!((s[0] - 1.0).abs() < 1e-12);
        assert!((s[1] - 1.75 / 0.75).abs() < 1e-12);
    }
}
