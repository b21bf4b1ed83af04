//! # drift-node
//!
//! The `drift` binary: the daemon that runs on every hypervisor host, and the command-line
//! tools that manage keys and rosters and talk to a running daemon.
//!
//! ## Layout
//!
//! - [`cli`]: one module per subcommand; parses arguments and prints results.
//! - [`identity`]: key files (created 0600, refused when readable by others) and roster files
//!   (the editable draft and the admin-signed roster).
//! - [`dataplane`]: the TLS 1.3 connections (raw node keys) that carry migrations' bytes,
//!   each bound to one accepted offer before a byte of the VM crosses it.
//! - [`durable`]: atomic, durable file writes (temp file, fsync, rename, fsync directory), so a
//!   crash never leaves a half-written key, roster or state file.
//! - [`metrics`]: the Prometheus series `GET /metrics` serves.
//! - [`witness`]: this node's audit heads published for peers to witness, and the heads of
//!   peers it countersigned and keeps.

pub mod admission;
pub mod audit;
pub mod autopilot;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod durable;
pub mod hypervisor;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod migration;
pub mod monitor;
pub mod move_plan;
pub mod sim;
pub mod state;
pub mod table;
pub mod testnet;
pub mod witness;
