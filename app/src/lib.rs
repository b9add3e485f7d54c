//! The wgpt desktop app: train GPT-2 and sample from it in a window, on the window's own wgpu
//! device.
//!
//! [`WgptApp`] holds all state and draws a frame from an [`egui::Ui`]; it is built from an
//! `Arc<Gpu>`, so tests drive it without a window. [`device`] configures eframe's wgpu setup so
//! the device it opens is one the engine can use.

pub mod app;
pub mod device;
pub mod forms;
mod ui;
pub mod worker;

pub use app::{RunStatus, Tab, WgptApp};
