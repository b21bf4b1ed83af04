//! # drift-protocol
//!
//! Everything of drift that crosses the wire or is signed, and nothing that touches a socket,
//! a file or a clock. Callers pass time (`now`) and state (last seen sequence numbers, the
//! current roster) in explicitly, so every function here is deterministic and testable.
//!
//! ## Layout
//!
//! - [`ids`]: [`NodeId`] (an ed25519 public key), [`VmId`], [`MigrationId`], [`Hash`].
//! - [`keys`]: [`SecretKey`] (zeroized on drop, redacted in `Debug`) and [`Signature`].
//! - [`signed`]: [`Signed<T>`], the one envelope for every signed object, with a domain tag per
//!   type and protocol version.
//! - [`codec`]: length-delimited, versioned frames with a hard size limit checked before any
//!   allocation; postcard payloads that must be consumed exactly.
//! - [`report`]: [`LoadReport`] and its validation ([`report::validate`]).
//! - [`roster`]: the admin-signed [`Roster`] of members, its validation, its epoch chain, and
//!   the k-of-n admins that sign each epoch.
//! - [`migration`]: [`MigrationOffer`] and [`MigrationDecision`], bound by the offer's hash.
//! - [`dataplane`]: the data connections that carry a migration's bytes (TLS 1.3 with raw
//!   node keys), the binding that ties each to one accepted offer, and their frames.
//! - [`transfer`]: the frames of a live-migration stream, the blake3 memory root, and the two
//!   state machines that run a transfer: [`transfer::receiver`] (the target, over untrusted
//!   frames) and [`transfer::sender`] (the source, and when it may resume the VM itself).
//! - [`tunnel`]: the frames around a QEMU migration stream that drift tunnels through the
//!   mesh, and the transcript root that binds what the two QEMUs sent and received.
//! - [`policy`]: the balancing policy: overload detection, VM and target choice, a simulator
//!   and a centralized baseline, as pure functions.
//! - [`dcsim`]: a data-center simulator replaying PlanetLab days under the published
//!   consolidation policies of Beloglazov & Buyya 2012, with CloudSim 3.0.3's metrics.
//! - [`audit`]: [`AuditRecord`], a signed, hash-chained log entry, and the chain verifier.
//! - [`witness`]: audit heads that peers countersign and keep, and the check of a log against
//!   them (a rewritten, cut or forked history is named).
//!
//! ## Wire rules
//!
//! - Every frame starts with a 4-byte big-endian length and a 1-byte protocol version
//!   ([`PROTOCOL_VERSION`]; `0` is never valid).
//! - A signature covers `len(tag) || tag || bytes`, where `tag` names the type and protocol
//!   version (see [`signed::Signable::DOMAIN`]), so a signature made for one type never verifies
//!   as another.
//! - Verification is strict (`verify_strict`: no small-order keys, no malleable signatures),
//!   then the signer's authority is checked against the roster, then the semantics.

#![forbid(unsafe_code)]

pub mod audit;
mod bounded;
pub mod codec;
pub mod dataplane;
pub mod dcsim;
pub mod ids;
pub mod keys;
pub mod migration;
pub mod policy;
pub mod report;
pub mod roster;
pub mod signed;
pub mod skew;
pub mod time;
pub mod transfer;
pub mod tunnel;
pub mod witness;

pub use audit::{AuditEvent, AuditRecord};
pub use codec::{DecodeError, FrameDecoder, MAX_FRAME_LEN};
pub use ids::{Hash, IdParseError, MigrationId, NodeId, VmId};
pub use keys::{KeyError, SecretKey, Signature};
pub use migration::{MigrationDecision, MigrationOffer, Mode, Placement, VmSummary};
pub use report::LoadReport;
pub use roster::{Announcement, Member, Role, Roster};
pub use signed::{Signable, Signed, VerifyError};
pub use time::Timestamp;
pub use transfer::TransferFrame;

/// The protocol version carried on every frame. Version `0` is reserved as invalid.
pub const PROTOCOL_VERSION: u8 = 1;
