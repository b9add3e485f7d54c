//! Training: schedule, optimiser settings, the training loop.

pub mod ladder;
pub mod metrics;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod trainer;
