//! Training: schedule, optimiser settings, the training loop.

pub mod parallel;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod trainer;
