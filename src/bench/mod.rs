//! Benchmarks shipped with the binary (`ti-scheduler bench ...`). They measure; they are
//! not tests. Each prints a Markdown table for the README.

pub mod ceiling;
pub mod history;
pub mod load;
pub mod prediction;
pub mod scale;
pub mod strategies;
pub mod workload;
