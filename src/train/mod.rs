//! Training: schedule, optimiser settings, the training loop.

pub mod schedule;
