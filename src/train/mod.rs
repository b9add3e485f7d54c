//! Training: schedule, optimiser settings, the training loop.

pub mod job;
pub mod ladder;
pub mod launch;
pub mod metrics;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod trainer;
