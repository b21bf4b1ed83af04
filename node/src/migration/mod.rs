//! Live migration: moving a VM between two nodes.
//!
//! - [`engine`] runs the source and the target side of a sandbox VM's transfer over a
//!   [`link`] (the migration's data connections, its mesh stream, or an in-memory pipe in
//!   tests), driving drift-protocol's [`Sender`](drift_protocol::transfer::sender::Sender) and
//!   [`Receiver`](drift_protocol::transfer::receiver::Receiver) state machines and the VM's
//!   memory (shared with its VMM, see [`crate::hypervisor::shared`]).
//! - [`tunnel`] does the same for QEMU VMs, whose memory QEMU moves itself: drift carries each
//!   of QEMU's channels between the nodes under the same handoff rules.
//! - [`service`] negotiates, records and resolves migrations of either kind.
//! - [`frames`] reads and writes bounded frames; [`buffers`] keeps page-batch buffers for
//!   reuse; [`record`] is the durable record of every migration; [`fault`] injects faults for
//!   the tests.

pub mod buffers;
pub mod engine;
pub mod fault;
pub mod frames;
pub mod link;
pub mod record;
pub mod recover;
pub mod service;
pub mod tunnel;
