//! holosync: keeps a verified local copy of a kiosk's pictures, synced over
//! MQTT through a durable SQLite queue, and forwards projector commands.
//!
//! See ARCHITECTURE.md for the loop, the modules and the invariants.

// Unsafe code is allowed only in `os`, the one module calling OS APIs directly.
#![deny(unsafe_code)]

pub mod agent;
pub mod cache;
pub mod cli;
pub mod client_id;
pub mod config;
pub mod dial;
pub mod download;
pub mod error;
pub mod http;
pub mod inbox;
pub mod intake;
pub mod link;
pub mod logger;
pub mod md5;
pub mod message;
pub mod operator;
pub mod os;
pub mod projector;
pub mod proxy;
pub mod queue;
pub mod random;
pub mod remote_config;
pub mod report;
pub mod signing;
pub mod swap;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transfers;
pub mod update;
pub mod update_fetch;
pub mod verify;
