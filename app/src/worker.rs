//! The engine thread: it owns the [`Trainer`] (and any [`Generator`]), takes [`Command`]s over
//! a channel and answers with [`Event`]s, so the window never waits on the GPU.
//!
//! Commands are read between steps: Pause, Stop and Generate take effect at the next step
//! boundary, which is also the only place a checkpoint is written. Sampling from the run uses
//! a generator built on the trainer's own parameter buffer, so nothing is copied or unloaded.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use wgpt::checkpoint::hf;
use wgpt::data::{Corpus, Tokenizer};
use wgpt::error::Setting;
use wgpt::gpu::Gpu;
use wgpt::sample::{Generator, SampleOptions};
use wgpt::train::launch::{Launch, Note, RunSpec};
use wgpt::train::run::{self as lib_run, Progress, RunEvent};
use wgpt::train::settings::TrainSettings;
use wgpt::train::trainer::{StepStats, Trainer};

/// A run to start: its data (a text file or a folder of shards) and the rest of its description.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub data: PathBuf,
    pub spec: RunSpec,
}

/// Which weights to sample from.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsSource {
    /// The trainer's live parameter buffer (paused, stopped or finished run).
    Run,
    /// A checkpoint file or folder, or a Hugging Face GPT-2 folder.
    Path(PathBuf),
}

#[derive(Clone, Debug)]
pub struct GenSpec {
    pub source: WeightsSource,
    pub prompt: String,
    pub samples: usize,
    pub options: SampleOptions,
}

pub enum Command {
    Start(Box<RunRequest>),
    Pause,
    Resume,
    /// Saves a checkpoint at the step boundary and ends the run (its weights stay loaded for
    /// sampling until the next start).
    Stop,
    Generate(GenSpec),
    /// Saves a checkpoint if a run has unsaved steps, then ends the thread.
    Shutdown,
}

#[derive(Clone, Debug)]
pub enum Event {
    /// A progress or information line for the log.
    Log(String),
    /// A run is set up and about to step.
    RunStarted {
        settings: Box<TrainSettings>,
        tokens: usize,
        params: usize,
        start_step: usize,
    },
    Step(StepStats),
    /// Validation loss after `step` steps.
    Val {
        step: usize,
        loss: f64,
    },
    /// Samples from the weights after `step` steps.
    Samples {
        step: usize,
        texts: Vec<String>,
    },
    Paused,
    Resumed,
    Saved(PathBuf),
    /// The run ended (finished its steps, stopped, or failed); `reason` says which.
    RunEnded {
        reason: String,
        /// Whether the run's weights are still loaded (stopped or finished: yes; failed: no).
        weights_kept: bool,
    },
    Error(String),
    GenStarted {
        samples: usize,
    },
    /// One token of one sample; `text` holds the characters it completes (possibly none when
    /// the token ends inside a multi-byte character).
    GenToken {
        sample: usize,
        text: String,
    },
    /// Trailing text of a sample that is not a token of its own (a character cut off by the
    /// token budget).
    GenText {
        sample: usize,
        text: String,
    },
    GenDone {
        tokens: usize,
        secs: f64,
    },
}

/// Wakes the UI after an event is sent.
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// The handle the UI holds: a command sender, an event receiver and the thread.
pub struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(gpu: Arc<Gpu>, notify: Notify) -> Worker {
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let (ev_tx, ev_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("wgpt engine".into())
            .spawn(move || {
                let mut engine = Engine {
                    gpu,
                    events: ev_tx,
                    notify,
                    run: None,
                    tokenizer: None,
                    data_cache: None,
                };
                engine.main_loop(cmd_rx);
            });
        match thread {
            Ok(t) => Worker {
                commands: cmd_tx,
                events: ev_rx,
                thread: Some(t),
            },
            Err(e) => {
                // No thread: commands go nowhere, and the UI is told why.
                let (tx, rx) = std::sync::mpsc::channel();
                let _ = tx.send(Event::Error(format!(
                    "could not start the engine thread: {e}"
                )));
                Worker {
                    commands: std::sync::mpsc::channel().0,
                    events: rx,
                    thread: None,
                }
            }
        }
    }

    pub fn send(&self, c: Command) {
        if self.commands.send(c).is_err() {
            log::warn!("the engine thread has ended; command dropped");
        }
    }

    /// Events received since the last call.
    pub fn poll(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Asks the thread to save and end, and waits for it.
    pub fn shutdown(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    /// Stopped or finished: weights kept for sampling, no more steps.
    Ended,
}

struct Run {
    /// The library's run: trainer, guards, evaluation and checkpoint schedule.
    run: lib_run::Run,
    state: RunState,
}

impl Run {
    fn trainer(&self) -> &Trainer {
        self.run.trainer()
    }
}

/// The Train panel's name for a setting, for errors from the library.
pub fn field_name(s: Setting) -> &'static str {
    match s {
        Setting::Model => "Model (layers, heads, width, context)",
        Setting::Data => "Data",
        Setting::Shuffle => "Shuffle",
        Setting::BatchSize => "Batch size",
        Setting::SeqLen => "Sequence length",
        Setting::GradAccum => "Gradient accumulation",
        Setting::Steps => "Steps",
        Setting::MaxLr => "Max learning rate",
        Setting::MinLrRatio => "Min learning rate ratio",
        Setting::WarmupSteps => "Warmup steps",
        Setting::WeightDecay => "Weight decay",
        Setting::GradClip => "Gradient clip",
        Setting::Seed => "Seed",
        Setting::Precision => "Precision",
        Setting::Attention => "Attention",
        Setting::Fusion => "Kernel fusion",
        Setting::FusedOptimizer => "Fused optimiser",
        Setting::ValEvery => "Validate every",
        Setting::ValSteps => "Validation batches",
        Setting::SampleEvery => "Sample every",
        Setting::HellaSwag => "HellaSwag file",
        Setting::EvalEvery => "Evaluate every",
        Setting::CheckpointDir => "Checkpoint folder",
    }
}

/// A library error in the panel's words: a setting's error names its field.
pub(crate) fn in_app_words(e: wgpt::Error) -> String {
    match e {
        wgpt::Error::Setting { setting, message } => format!("{}: {message}", field_name(setting)),
        other => other.to_string(),
    }
}

struct Engine {
    gpu: Arc<Gpu>,
    events: Sender<Event>,
    notify: Notify,
    run: Option<Run>,
    tokenizer: Option<Tokenizer>,
    data_cache: Option<(PathBuf, Corpus)>,
}

/// Turns a panic payload into text.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

impl Engine {
    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
        (self.notify)();
    }

    fn error(&self, e: impl std::fmt::Display) {
        self.emit(Event::Error(e.to_string()));
    }

    fn main_loop(&mut self, commands: Receiver<Command>) {
        loop {
            let stepping = self
                .run
                .as_ref()
                .is_some_and(|r| r.state == RunState::Running);
            let command = if stepping {
                match commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    // The UI is gone: save and end as on Shutdown.
                    Err(TryRecvError::Disconnected) => Some(Command::Shutdown),
                }
            } else {
                Some(commands.recv().unwrap_or(Command::Shutdown))
            };
            match command {
                Some(Command::Shutdown) => {
                    self.guarded("saving before exit", |e| e.save_if_unsaved());
                    return;
                }
                Some(c) => self.guarded("handling a command", |e| e.handle(c)),
                None => self.guarded("training step", |e| e.step()),
            }
        }
    }

    /// Runs `f`, turning a panic inside the engine into an error shown in the window; the run,
    /// whose GPU state is then unknown, is dropped.
    fn guarded(&mut self, what: &str, f: impl FnOnce(&mut Engine)) {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(self))) {
            let had_run = self.run.take().is_some();
            self.error(format!("internal error while {what}: {}", panic_text(p)));
            if had_run {
                self.emit(Event::RunEnded {
                    reason: "ended by an internal error".into(),
                    weights_kept: false,
                });
            }
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Start(spec) => self.start(*spec),
            Command::Pause => {
                if let Some(r) = self.run.as_mut().filter(|r| r.state == RunState::Running) {
                    r.state = RunState::Paused;
                    self.emit(Event::Paused);
                }
            }
            Command::Resume => {
                if let Some(r) = self.run.as_mut().filter(|r| r.state == RunState::Paused) {
                    r.state = RunState::Running;
                    self.emit(Event::Resumed);
                }
            }
            Command::Stop => {
                let active = self
                    .run
                    .as_ref()
                    .is_some_and(|r| r.state != RunState::Ended);
                if active {
                    self.save_if_unsaved();
                    if let Some(r) = self.run.as_mut() {
                        r.state = RunState::Ended;
                        let step = r.trainer().step_index();
                        self.emit(Event::RunEnded {
                            reason: format!("stopped after step {step}"),
                            weights_kept: true,
                        });
                    }
                }
            }
            Command::Generate(spec) => self.generate(spec),
            Command::Shutdown => {}
        }
    }

    fn tokenizer(&mut self) -> &Tokenizer {
        self.tokenizer.get_or_insert_with(Tokenizer::gpt2)
    }

    /// A text file (tokenised once and kept) or a folder of shards.
    fn load_data(&mut self, path: &Path) -> wgpt::Result<Corpus> {
        if let Some((p, t)) = &self.data_cache {
            if p == path {
                return Ok(t.clone());
            }
        }
        let corpus = Corpus::open(path)?;
        self.data_cache = Some((path.to_path_buf(), corpus.clone()));
        Ok(corpus)
    }

    fn start(&mut self, request: RunRequest) {
        if self
            .run
            .as_ref()
            .is_some_and(|r| r.state != RunState::Ended)
        {
            self.error("a run is already in progress; stop it before starting another");
            return;
        }
        // The previous run's buffers go before the new ones are allocated.
        self.run = None;
        match self.build_run(request) {
            Ok(run) => {
                let t = run.trainer();
                self.emit(Event::RunStarted {
                    settings: Box::new(t.settings().clone()),
                    tokens: self
                        .data_cache
                        .as_ref()
                        .map_or(0, |(_, t)| t.train_tokens()),
                    params: t.layout().num_params(),
                    start_step: t.step_index(),
                });
                self.run = Some(run);
                self.check_finished();
            }
            Err(e) => {
                self.error(in_app_words(e));
                self.emit(Event::RunEnded {
                    reason: "could not start".into(),
                    weights_kept: false,
                });
            }
        }
    }

    /// The run the library launches from the request, its notes shown in the log (but the hint
    /// for a CPU adapter's default preset, which speaks of headless-train's flag).
    fn build_run(&mut self, request: RunRequest) -> wgpt::Result<Run> {
        let corpus = self.load_data(&request.data)?;
        self.emit(Event::Log(format!(
            "loaded {} tokens from {}{}",
            corpus.train_tokens(),
            request.data.display(),
            corpus
                .describe_shards()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        )));
        let (events, notify) = (self.events.clone(), self.notify.clone());
        let mut note = move |n: Note| {
            if !matches!(n, Note::DefaultPreset { .. }) {
                for line in n.to_string().lines() {
                    let _ = events.send(Event::Log(line.into()));
                }
                notify();
            }
        };
        let launch = Launch::prepare(self.gpu.clone(), corpus, request.spec, &mut note)?;
        Ok(Run {
            run: launch.start(&mut note)?,
            state: RunState::Running,
        })
    }

    /// What the library's run reports, forwarded to the window.
    fn reporter(&self) -> impl FnMut(RunEvent) -> wgpt::Result<()> {
        let (events, notify) = (self.events.clone(), self.notify.clone());
        move |e| {
            Self::forward(&events, &notify, e);
            Ok(())
        }
    }

    fn forward(events: &Sender<Event>, notify: &Notify, e: RunEvent) {
        let ev = match e {
            RunEvent::Step { stats, .. } => Event::Step(*stats),
            RunEvent::Validation { step, loss } => Event::Val { step, loss },
            RunEvent::Samples { step, texts } => Event::Samples { step, texts },
            RunEvent::HellaSwag { step, score } => Event::Log(format!(
                "step {step}: HellaSwag acc_norm {}/{} = {:.4}",
                score.correct,
                score.total,
                score.acc_norm()
            )),
            RunEvent::Saved { path } => Event::Saved(path),
            // Data-parallel runs only (headless-train under mpirun); the app trains alone.
            RunEvent::Replicas {
                step,
                ranks,
                checksum,
            } => Event::Log(format!(
                "step {step}: weights identical on {ranks} ranks (checksum {checksum:016x})"
            )),
        };
        let _ = events.send(ev);
        notify();
    }

    /// One step (with the evaluations and checkpoints due), as the library's run schedules
    /// them; its guards end the run with their reason.
    fn step(&mut self) {
        let mut on = self.reporter();
        let Some(run) = self.run.as_mut() else { return };
        match run.run.advance(1, &mut on) {
            Ok(Progress::Running) => {}
            Ok(Progress::Finished) => {
                run.state = RunState::Ended;
                let n = run.trainer().step_index();
                self.emit(Event::RunEnded {
                    reason: format!("finished: {n} steps"),
                    weights_kept: true,
                });
            }
            Err(e @ wgpt::Error::Setting { .. }) => {
                // A guard stopped it: the weights stay for sampling (a diverged run is worth
                // looking at).
                run.state = RunState::Ended;
                let step = run.trainer().step_index();
                self.error(in_app_words(e));
                self.emit(Event::RunEnded {
                    reason: format!("stopped at step {step}"),
                    weights_kept: true,
                });
            }
            Err(e) => {
                self.run = None;
                self.error(format!("training step failed: {e}"));
                self.emit(Event::RunEnded {
                    reason: "failed".into(),
                    weights_kept: false,
                });
            }
        }
    }

    /// Ends a run that has done all its steps (a resumed run may have none left).
    fn check_finished(&mut self) {
        let done = self.run.as_ref().is_some_and(|r| {
            r.state != RunState::Ended && r.trainer().step_index() >= r.trainer().settings().steps
        });
        if done {
            self.step();
        }
    }

    /// Writes a checkpoint unless one exists for the current step.
    fn save_if_unsaved(&mut self) {
        let mut on = self.reporter();
        let Some(run) = self.run.as_mut() else { return };
        if let Err(e) = run.run.save(&mut on) {
            self.error(format!(
                "could not save the checkpoint: {}",
                in_app_words(e)
            ));
        }
    }

    fn generate(&mut self, spec: GenSpec) {
        if let Err(e) = self.try_generate(spec) {
            self.error(format!("generation failed: {e}"));
            self.emit(Event::GenDone {
                tokens: 0,
                secs: 0.0,
            });
        }
    }

    fn try_generate(&mut self, spec: GenSpec) -> wgpt::Result<()> {
        let o = &spec.options;
        if o.top_k == 0 {
            return Err(wgpt::Error::Config(
                "top-k must be at least 1 (1 is greedy decoding)".into(),
            ));
        }
        if !(o.temperature > 0.0 && o.temperature.is_finite()) {
            return Err(wgpt::Error::Config(format!(
                "the temperature must be a positive number (got {})",
                o.temperature
            )));
        }
        let prompt = self.tokenizer().encode(&spec.prompt);
        let mut generator = match &spec.source {
            WeightsSource::Run => {
                let run = self.run.as_ref().ok_or_else(|| {
                    wgpt::Error::Config(
                        "there is no run to sample from; start one, or pick a checkpoint".into(),
                    )
                })?;
                if run.state == RunState::Running {
                    self.emit(Event::Log(format!(
                        "sampling between steps {} and {}",
                        run.trainer().step_index(),
                        run.trainer().step_index() + 1
                    )));
                }
                let t = run.trainer();
                Generator::new(
                    self.gpu.clone(),
                    t.settings().config,
                    t.stored_params().clone(),
                    spec.samples,
                )?
            }
            WeightsSource::Path(p) => {
                let c = hf::load_any(p)?;
                self.emit(Event::Log(format!(
                    "sampling from {} ({})",
                    p.display(),
                    c.config.describe()
                )));
                Generator::from_checkpoint(self.gpu.clone(), &c, spec.samples)?
            }
        };
        generator.check_fits(prompt.len(), o.max_new_tokens)?;
        self.emit(Event::GenStarted {
            samples: spec.samples,
        });
        let tokenizer = self.tokenizer.get_or_insert_with(Tokenizer::gpt2);
        let mut pending: Vec<Vec<u32>> = vec![Vec::new(); spec.samples];
        let start = Instant::now();
        let mut produced = 0usize;
        let (events, notify) = (&self.events, &self.notify);
        generator.generate(&prompt, o, |sample, token| {
            produced += 1;
            let Some(p) = pending.get_mut(sample) else {
                return;
            };
            // Send whole characters only: a token may end inside one.
            p.push(token);
            let bytes = tokenizer.decode_bytes(p);
            let text = match std::str::from_utf8(&bytes) {
                Ok(s) => {
                    p.clear();
                    s.to_string()
                }
                Err(_) => String::new(),
            };
            let _ = events.send(Event::GenToken { sample, text });
            notify();
        })?;
        // Bytes of a character cut off by the token budget.
        for (sample, p) in pending.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            let text = String::from_utf8_lossy(&tokenizer.decode_bytes(p)).into_owned();
            let _ = self.events.send(Event::GenText { sample, text });
        }
        self.emit(Event::GenDone {
            tokens: produced,
            secs: start.elapsed().as_secs_f64(),
        });
        Ok(())
    }
}
