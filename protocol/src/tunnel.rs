//! Tunnelled QEMU migrations: the frames around QEMU's own migration stream.
//!
//! QEMU moves a QEMU VM's memory and devices itself; drift carries QEMU's bytes between the two
//! nodes over the mesh and keeps the handoff rules of every drift migration. Two kinds of
//! stream carry one migration, both Noise-encrypted and open only between roster members:
//!
//! - the **control** stream, the migration stream on which the offer was accepted
//!   (`/drift/migrate/1`), carries [`TunnelControl`] frames after the decision;
//! - one **channel** stream (`/drift/tunnel/1`) per connection QEMU opens (the main channel,
//!   then one per multifd channel), each starting with a [`ChannelOpen`] naming the migration
//!   and the channel's index, answered by the target's [`ChannelAnswer`], then QEMU's bytes
//!   both ways. The source opens channels one at a time, each after the previous one was
//!   answered: a peer takes a new inbound stream only when it is ready for it, so a stream
//!   that arrives too early is dropped unanswered, and the source opens it again (no byte of
//!   QEMU's has crossed it yet).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant SQ as source QEMU
//!     participant S as source node
//!     participant T as target node
//!     participant TQ as target QEMU (-incoming defer -S)
//!     T->>TQ: capabilities, migrate-incoming unix:
//!     T->>S: Ready
//!     S->>SQ: capabilities, migrate unix:
//!     SQ->>S: connection i (main, multifd...)
//!     S->>T: /drift/tunnel/1: ChannelOpen{id, i}
//!     T->>S: ChannelAnswer::Accepted; then bytes both ways
//!     T->>TQ: connection i, in index order
//!     Note over SQ: pre-switchover: VM paused
//!     Note over S: record: switching; migrate-continue
//!     SQ-->>TQ: last pages, device state
//!     Note over SQ: completed (stays paused)
//!     S->>T: Complete{root = transcript root}
//!     Note over T: TQ completed; its transcript root equal? record: committed; cont
//!     T->>S: Commit
//!     Note over S: record: committed; quit source QEMU
//! ```
//!
//! The **transcript root** binds what the source's QEMU sent to what the target's QEMU
//! received: each side hashes the source-to-target bytes of every channel it forwarded, and
//! [`transcript_root`] combines them. The source signs it in `Complete`; the target resumes
//! only if its own root is equal, so a truncated, reordered or altered stream never runs.

use serde::{Deserialize, Serialize};

use crate::ids::{Hash, MigrationId};
use crate::signed::Signed;
use crate::transfer::{Abort, Commit, Complete};

/// Most channels one tunnelled migration may open: the main channel and up to
/// [`crate::migration::MAX_MULTIFD_CHANNELS`] multifd channels.
pub const MAX_CHANNELS: u32 = 1 + crate::migration::MAX_MULTIFD_CHANNELS;

/// The first frame of a channel stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelOpen {
    pub id: MigrationId,
    /// 0 for the first connection QEMU opened (its main channel), then 1, 2, ...
    pub channel: u32,
}

/// The target's answer to a [`ChannelOpen`], before any of QEMU's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelAnswer {
    /// Never valid (a zeroed frame).
    Invalid,
    /// The channel is connected (or will be, in index order) to the target's QEMU.
    Accepted,
    /// No accepted tunnelled migration with that id from this peer.
    UnknownMigration,
    /// The index is beyond the channels the offer agreed on.
    BeyondAgreed,
    /// A channel with that index was answered already.
    AlreadyOpen,
}

/// Frames on the control stream of a tunnelled migration, after the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelControl {
    /// Never valid (a zeroed frame).
    Invalid,
    /// Target: its QEMU waits for the migration; channels may open.
    Ready,
    /// Source: its QEMU completed; `root` is the transcript root, `page_count` the number of
    /// source-to-target bytes forwarded.
    Complete(Signed<Complete>),
    /// Target: the transcript root matched and the commit is durable; the VM runs here.
    Commit(Signed<Commit>),
    /// Either side: the migration ends here; before switchover the VM stays on the source.
    Abort(Abort),
    /// Target, post-copy: its QEMU loaded the device state and the guest runs there. Before
    /// this a broken channel fails the target's QEMU (it cannot pause for a recovery while it
    /// still loads the device state); from this on QEMU pauses and drift recovers the link.
    Running,
}

/// What one side forwarded on one channel, source to target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelDigest {
    pub channel: u32,
    pub bytes: u64,
    pub hash: Hash,
}

/// The transcript root of a tunnelled migration: blake3 over every channel's index, byte count
/// and hash, in index order. Channels given out of order are sorted first; a channel given
/// twice counts twice (and so never matches an honest peer's root).
pub fn transcript_root(channels: &[ChannelDigest]) -> Hash {
    let mut sorted = channels.to_vec();
    sorted.sort_by_key(|c| c.channel);
    let mut h = blake3::Hasher::new();
    h.update(b"drift/tunnel-transcript/v1");
    h.update(&(sorted.len() as u64).to_le_bytes());
    for c in &sorted {
        h.update(&c.channel.to_le_bytes());
        h.update(&c.bytes.to_le_bytes());
        h.update(&c.hash.0);
    }
    Hash::from(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(channel: u32, data: &[u8]) -> ChannelDigest {
        ChannelDigest {
            channel,
            bytes: data.len() as u64,
            hash: Hash::of(data),
        }
    }

    #[test]
    fn the_root_depends_on_every_channel_but_not_on_the_order_given() {
        let a = [digest(0, b"main"), digest(1, b"multifd-1")];
        let b = [digest(1, b"multifd-1"), digest(0, b"main")];
        assert_eq!(transcript_root(&a), transcript_root(&b));
        let altered = [digest(0, b"main"), digest(1, b"multifd-X")];
        assert_ne!(transcript_root(&a), transcript_root(&altered));
        let fewer = [digest(0, b"main")];
        assert_ne!(transcript_root(&a), transcript_root(&fewer));
        let swapped = [digest(1, b"main"), digest(0, b"multifd-1")];
        assert_ne!(transcript_root(&a), transcript_root(&swapped));
        let twice = [digest(0, b"main"), digest(0, b"main")];
        assert_ne!(transcript_root(&fewer), transcript_root(&twice));
    }
}
