//! Task Instances: the protocol's wire types, the client the scheduler uses, the
//! allow-list of where TIs may be registered, and the simulated TI that tests, the demo
//! and benchmarks run.

mod allow_list;
mod client;
pub mod openai;
pub mod openai_sim;
pub mod protocol;
pub mod sim;

pub use allow_list::AllowList;
pub use client::{upstream_body, TiClient, TiError, TiInfo};
