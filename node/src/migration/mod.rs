//! Live migration: the engine that moves a VM's memory between two VMMs over one stream.
//!
//! [`engine`] runs the source and the target side of a transfer over any byte stream (a
//! libp2p stream between nodes; an in-memory pipe in tests), driving drift-protocol's
//! [`Sender`](drift_protocol::transfer::sender::Sender) and
//! [`Receiver`](drift_protocol::transfer::receiver::Receiver) state machines and the VMMs.

pub mod engine;
pub mod frames;
pub mod service;
