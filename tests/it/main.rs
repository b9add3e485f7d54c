//! The integration tests, one binary: the test modules share one device (and the pipelines
//! it has built), and cargo runs their tests on one pool of threads.

#[path = "../common/mod.rs"]
mod common;

mod attention;
mod checkpoint;
mod checkpoint_bytes;
mod cli;
mod crossentropy;
mod data;
mod elementwise;
mod embedding;
mod evaluation;
mod faults;
mod generate;
mod gpu;
mod kill;
mod layernorm;
mod matmul;
mod matmul_coop;
mod optimizer;
mod plan;
mod shaders;
mod shards;
mod subgroup_sizes;
mod train;
