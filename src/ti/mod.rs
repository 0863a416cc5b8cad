//! Task Instances: the protocol's wire types, the client the scheduler uses, and the
//! simulated TI that tests, the demo and benchmarks run.

mod client;
pub mod protocol;
pub mod sim;

pub use client::{TiClient, TiError, TiInfo};
