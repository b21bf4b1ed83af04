//! Live migration: the engine that moves a VM's memory between two VMMs over one stream.
//!
//! [`engine`] runs the source and the target side of a transfer over any byte stream (a
//! libp2p stream between nodes; an in-memory pipe in tests), driving drift-protocol's
//! [`Sender`](drift_protocol::transfer::sender::Sender) and
//! [`Receiver`](drift_protocol::transfer::receiver::Receiver) state machines and the VMMs of
//! sandbox VMs. [`tunnel`] does the same for QEMU VMs, whose memory QEMU moves itself: drift
//! carries QEMU's migration stream through the mesh under the same handoff rules. [`service`]
//! negotiates, records and resolves migrations of either kind.

pub mod engine;
pub mod fault;
pub mod frames;
pub mod record;
pub mod service;
pub mod tunnel;
