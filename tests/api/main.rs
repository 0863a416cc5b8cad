//! Integration tests over real HTTP, a real database (an SQLite file in a temp dir, or a
//! PostgreSQL database of its own when `TI_TEST_POSTGRES` names a server: see
//! `helpers.rs`) and real simulated Task Instances on ephemeral loopback ports.

mod helpers;

mod admission;
mod cleanup;
mod cli;
mod dashboard;
mod docs;
mod events;
mod faults;
mod front_door;
mod fuzz;
mod hardening;
mod insight;
mod longpoll;
mod openai;
mod ops;
mod prediction;
mod queue;
mod restart;
mod result;
mod scheduler;
mod strategies;
mod task;
mod tasks;
mod telemetry;
mod ti;
