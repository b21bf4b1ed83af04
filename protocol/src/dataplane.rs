//! The data plane: the connections that carry a migration's bytes, apart from the mesh.
//!
//! Negotiation, resolve queries and gossip stay on the libp2p mesh. A migration's memory pages
//! (sandbox VMs) and QEMU's migration channels move on **data connections** of their own: TCP,
//! then TLS 1.3 in which both ends authenticate with their node keys as raw ed25519 public keys
//! (RFC 7250: no certificates, no CA). Each data connection serves exactly one accepted offer,
//! and proves it before the target reads a single byte of the VM:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source node
//!     participant T as target node
//!     S->>T: offer {.., data_connections: k} (on the mesh)
//!     T->>S: decision Accept {.., data: DataEndpoint {port, addrs, connections: n <= k}}
//!     loop i in 0..n
//!         S->>T: TCP connect, TLS 1.3 handshake (raw keys: S's and T's node keys)
//!         S->>T: Signed<DataBinding> {id, offer hash, index i, TLS exporter}
//!         Note over T: signer = TLS peer = offer's source, exporter = this connection's,<br/>migration accepted and open, i < n, i not taken
//!         T->>S: DataAnswer::Accepted (or the refusal, audited)
//!     end
//!     S->>T: the transfer, on the data connections
//! ```
//!
//! The binding is signed by the source's node key over a value exported from this very TLS
//! session ([`EXPORTER_LABEL`]): recorded on one connection, it proves nothing on another, so a
//! binding cannot be replayed, and a proxy that terminates TLS with any other key fails the
//! handshake (each end pins the other's key) before it could present one.
//!
//! A sandbox transfer spreads its frames over its connections as [`DataFrame`]s numbered from
//! 1 in the order the source sent them; the target puts them back in that order (see the node's
//! data plane) before its state machine sees them. The target's answers (`PageRequest`,
//! `Commit`, `Abort`) go back on connection 0, numbered the same way. A QEMU migration maps each
//! of QEMU's channels to one connection (`index` = channel), carrying QEMU's bytes as they are.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::ids::{Hash, MigrationId, NodeId};
use crate::signed::{Signable, Signed, VerifyError};
use crate::transfer::{PageBatch, PageEntry, TransferFrame, MAX_PAGES_PER_BATCH};

/// Most data connections one migration may use (a sandbox transfer's, or a QEMU migration's
/// main and multifd channels). Bounds the target's bookkeeping (claims are bits of a `u64`).
pub const MAX_DATA_CONNECTIONS: u32 = 32;
/// At most this many announced addresses in a [`DataEndpoint`].
pub const MAX_DATA_ADDRS: usize = 8;
/// Longest announced address (`host:port` text).
pub const MAX_DATA_ADDR_LEN: usize = 256;
/// The largest binding frame: a signed binding is about 200 bytes.
pub const MAX_BINDING_FRAME: usize = 1024;
/// The largest answer frame.
pub const MAX_ANSWER_FRAME: usize = 64;
/// The TLS exporter label (RFC 8446 §7.5) of the value a binding signs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-drift-data-binding-v1";
/// Bytes of exported keying material a binding signs.
pub const EXPORTER_LEN: usize = 32;

/// Where a target takes a migration's data connections, announced in its signed decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataEndpoint {
    /// The data port. With no usable address in `addrs`, the source dials the address it
    /// reaches the target's mesh connection on, at this port.
    pub port: u16,
    /// Addresses (`ip:port`) to try first, in order.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_DATA_ADDRS>")]
    pub addrs: Vec<String>,
    /// How many connections the target takes for this migration (at most what the offer
    /// asked for).
    pub connections: u32,
}

impl DataEndpoint {
    /// Whether every value is within bounds.
    pub fn well_formed(&self) -> bool {
        self.addrs.len() <= MAX_DATA_ADDRS
            && self
                .addrs
                .iter()
                .all(|a| !a.is_empty() && a.len() <= MAX_DATA_ADDR_LEN)
            && (1..=MAX_DATA_CONNECTIONS).contains(&self.connections)
    }
}

/// The first record on a data connection: which accepted offer it serves, as which
/// connection, signed over this TLS session's exporter value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataBinding {
    pub id: MigrationId,
    /// Hash of the accepted `Signed<MigrationOffer>`.
    pub offer: Hash,
    /// 0-based: the connection's place among the migration's (a QEMU channel's index).
    pub index: u32,
    /// [`EXPORTER_LEN`] bytes exported from this connection's TLS session with
    /// [`EXPORTER_LABEL`].
    pub exporter: [u8; EXPORTER_LEN],
}

impl Signable for DataBinding {
    const DOMAIN: &'static str = "drift/data-binding/v1";
}

/// The target's answer to a binding, before anything else crosses the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataAnswer {
    /// Never valid (a zeroed frame).
    Invalid,
    /// The connection serves the migration; its bytes follow.
    Accepted,
    /// The binding is malformed, not signed by the TLS peer, or signed for another session.
    BadBinding,
    /// No accepted, unfinished migration with that id and offer here.
    UnknownMigration,
    /// The migration's source is another node.
    NotTheSource,
    /// The index is beyond the connections the decision granted.
    BeyondAgreed,
    /// A connection with that index was bound already.
    AlreadyOpen,
}

impl DataAnswer {
    /// A stable, short label for the audit log and counters.
    pub fn label(&self) -> &'static str {
        match self {
            DataAnswer::Invalid => "invalid",
            DataAnswer::Accepted => "accepted",
            DataAnswer::BadBinding => "bad_binding",
            DataAnswer::UnknownMigration => "unknown_migration",
            DataAnswer::NotTheSource => "not_the_source",
            DataAnswer::BeyondAgreed => "beyond_agreed",
            DataAnswer::AlreadyOpen => "already_open",
        }
    }
}

/// What the target checks on a binding from the TLS peer `peer`, whose session exported
/// `exporter`: signed by that peer, for that session. The caller then looks the migration up
/// (source, offer hash, index, whether taken).
pub fn validate_binding(
    signed: &Signed<DataBinding>,
    peer: &NodeId,
    exporter: &[u8; EXPORTER_LEN],
) -> Result<DataBinding, BindingError> {
    let binding = signed.verify_by(peer).map_err(BindingError::Signature)?;
    if &binding.exporter != exporter {
        return Err(BindingError::OtherSession);
    }
    Ok(binding)
}

/// Why a binding does not bind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("binding signature: {0}")]
    Signature(VerifyError),
    #[error("binding was signed for another TLS session (replayed)")]
    OtherSession,
}

/// One transfer frame on a data connection, numbered in the order its sender sent it across
/// all of the migration's connections (from 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFrame {
    pub seq: u64,
    pub frame: TransferFrame,
}

/// The variant index of [`TransferFrame::Pages`] on the wire.
const PAGES_VARIANT: u32 = 1;
/// Bytes of a page batch's hash, the last field of its encoding.
const HASH_LEN: usize = 32;
/// The longest a numbered `Pages` frame's payload can be up to its page data: the number,
/// the variants, the round, [`MAX_PAGES_PER_BATCH`] entries (page number, kind, and a packed
/// page's length) and the data's length.
pub const MAX_PAGES_HEAD: usize = 10 + 5 + 5 + 3 + MAX_PAGES_PER_BATCH * (10 + 1 + 3) + 5;

/// A numbered `Pages` frame cut around its page data, so the data moves from the batch to the
/// connection, and from the connection into a batch, with no copy of its own: `head ‖ data ‖
/// tail` is exactly the frame of `DataFrame { seq, frame: Pages(batch) }` (header included).
pub fn pages_frame_parts(seq: u64, batch: &PageBatch) -> (Vec<u8>, [u8; HASH_LEN]) {
    let head = pages_head_payload(seq, batch.round, batch.entries.clone(), batch.data.len());
    let len = 1 + head.len() + batch.data.len() + HASH_LEN;
    let mut framed = Vec::with_capacity(codec::HEADER_LEN + head.len());
    framed.extend_from_slice(&(len as u32).to_be_bytes());
    framed.push(crate::PROTOCOL_VERSION);
    framed.extend_from_slice(&head);
    (framed, batch.hash.0)
}

/// The payload bytes of a numbered `Pages` frame up to its page data: its encoding with no
/// data (which ends with the empty data's one-byte length and the hash) cut before that
/// length, then the real data's length.
fn pages_head_payload(seq: u64, round: u32, entries: Vec<PageEntry>, data_len: usize) -> Vec<u8> {
    let hollow = DataFrame {
        seq,
        frame: TransferFrame::Pages(PageBatch {
            round,
            entries,
            data: Vec::new(),
            hash: Hash::ZERO,
        }),
    };
    let mut head = codec::encode_payload(&hollow);
    head.truncate(head.len() - 1 - HASH_LEN);
    head.extend_from_slice(&codec::encode_payload(&(data_len as u64)));
    head
}

/// The start of a numbered `Pages` frame's payload, parsed: all of its batch but the data and
/// the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagesHead {
    pub seq: u64,
    pub round: u32,
    pub entries: Vec<PageEntry>,
    /// Bytes of page data that follow.
    pub data_len: usize,
    /// Bytes of the payload before the data.
    pub head_len: usize,
}

impl PagesHead {
    /// The frame, once its data and hash arrived.
    pub fn into_frame(self, data: Vec<u8>, hash: [u8; HASH_LEN]) -> DataFrame {
        DataFrame {
            seq: self.seq,
            frame: TransferFrame::Pages(PageBatch {
                round: self.round,
                entries: self.entries,
                data,
                hash: Hash(hash),
            }),
        }
    }
}

/// Parses the start of a numbered frame's payload of `payload_len` bytes, of which `start` holds
/// the first bytes (at least [`MAX_PAGES_HEAD`] of them, or the whole payload if shorter).
/// `Ok(None)`: not a `Pages` frame (decode it whole). A `Pages` frame's head must be in its one
/// canonical encoding, and head, data and hash must fill the payload exactly; its page data and
/// hash are checked with the batch ([`PageBatch::into_checked`]).
pub fn parse_pages_head(
    start: &[u8],
    payload_len: usize,
) -> Result<Option<PagesHead>, codec::DecodeError> {
    #[derive(serde::Deserialize)]
    struct Batch {
        round: u32,
        #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_PAGES_PER_BATCH>")]
        entries: Vec<PageEntry>,
        data_len: u64,
    }
    let malformed = codec::DecodeError::Malformed;
    let ((seq, variant), rest) =
        postcard::take_from_bytes::<(u64, u32)>(start).map_err(malformed)?;
    if variant != PAGES_VARIANT {
        return Ok(None);
    }
    let (batch, rest) = postcard::take_from_bytes::<Batch>(rest).map_err(malformed)?;
    let head_len = start.len() - rest.len();
    let data_len = usize::try_from(batch.data_len).unwrap_or(usize::MAX);
    if head_len
        .checked_add(data_len)
        .and_then(|n| n.checked_add(HASH_LEN))
        != Some(payload_len)
    {
        return Err(codec::DecodeError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    // One encoding per value: the head must read back as written.
    if pages_head_payload(seq, batch.round, batch.entries.clone(), data_len) != start[..head_len] {
        return Err(codec::DecodeError::NotCanonical);
    }
    Ok(Some(PagesHead {
        seq,
        round: batch.round,
        entries: batch.entries,
        data_len,
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;

    fn binding(exporter: [u8; EXPORTER_LEN]) -> DataBinding {
        DataBinding {
            id: MigrationId::from_bytes([5; 16]),
            offer: Hash::of(b"offer"),
            index: 1,
            exporter,
        }
    }

    #[test]
    fn a_binding_holds_only_for_its_signer_and_its_session() {
        let source = SecretKey::from_bytes(&[1; 32]);
        let other = SecretKey::from_bytes(&[2; 32]);
        let signed = Signed::sign(&binding([7; EXPORTER_LEN]), &source);
        assert_eq!(
            validate_binding(&signed, &source.public(), &[7; EXPORTER_LEN]),
            Ok(binding([7; EXPORTER_LEN]))
        );
        // Replayed on another TLS session: the exporter differs.
        assert_eq!(
            validate_binding(&signed, &source.public(), &[8; EXPORTER_LEN]),
            Err(BindingError::OtherSession)
        );
        // Presented by another peer than its signer.
        assert!(matches!(
            validate_binding(&signed, &other.public(), &[7; EXPORTER_LEN]),
            Err(BindingError::Signature(VerifyError::WrongSigner { .. }))
        ));
        // Signed by the peer, but naming a session of someone else's is still refused.
        let by_other = Signed::sign(&binding([9; EXPORTER_LEN]), &other);
        assert_eq!(
            validate_binding(&by_other, &other.public(), &[7; EXPORTER_LEN]),
            Err(BindingError::OtherSession)
        );
    }

    fn batch(pages: &[(u64, u8)]) -> PageBatch {
        let data: Vec<Vec<u8>> = pages
            .iter()
            .map(|&(_, fill)| vec![fill; crate::transfer::PAGE_SIZE])
            .collect();
        PageBatch::build(
            7,
            pages.iter().zip(&data).map(|(&(pfn, _), d)| (pfn, &d[..])),
        )
    }

    #[test]
    fn a_pages_frame_cut_around_its_data_is_the_frame_and_parses_back() {
        for (seq, b) in [
            (1, batch(&[])),
            (300, batch(&[(5, 1), (6, 0), (1 << 40, 3)])),
            (
                u64::MAX,
                batch(&(0..256).map(|p| (p, (p % 7) as u8)).collect::<Vec<_>>()),
            ),
        ] {
            let (head, tail) = pages_frame_parts(seq, &b);
            let mut cut = head.clone();
            cut.extend_from_slice(&b.data);
            cut.extend_from_slice(&tail);
            let whole = codec::encode_frame(&DataFrame {
                seq,
                frame: TransferFrame::Pages(b.clone()),
            });
            assert_eq!(cut, whole);
            let payload = &whole[codec::HEADER_LEN..];
            let start = &payload[..payload.len().min(MAX_PAGES_HEAD)];
            let parsed = parse_pages_head(start, payload.len()).unwrap().unwrap();
            assert_eq!(parsed.head_len, head.len() - codec::HEADER_LEN);
            assert_eq!(parsed.data_len, b.data.len());
            let back = parsed.into_frame(b.data.clone(), tail);
            assert_eq!(back.frame, TransferFrame::Pages(b));
            assert_eq!(back.seq, seq);
        }
    }

    #[test]
    fn other_frames_are_not_pages_and_bad_heads_are_refused() {
        let other = codec::encode_payload(&DataFrame {
            seq: 3,
            frame: TransferFrame::Applied(crate::transfer::Applied { round: 1 }),
        });
        assert_eq!(parse_pages_head(&other, other.len()), Ok(None));

        let b = batch(&[(5, 1)]);
        let whole = codec::encode_frame(&DataFrame {
            seq: 9,
            frame: TransferFrame::Pages(b),
        });
        let payload = &whole[codec::HEADER_LEN..];
        // A length that does not fill the payload exactly.
        assert!(parse_pages_head(payload, payload.len() + 1).is_err());
        assert!(parse_pages_head(payload, payload.len() - 1).is_err());
        // An overlong varint for the sequence number: the same value, another encoding.
        let mut overlong = vec![0x89, 0x00];
        overlong.extend_from_slice(&payload[1..]);
        assert_eq!(
            parse_pages_head(&overlong, overlong.len()),
            Err(codec::DecodeError::NotCanonical)
        );
        // Truncated before the data's length.
        assert!(parse_pages_head(&payload[..3], payload.len()).is_err());
    }

    #[test]
    fn endpoints_are_bounded() {
        let ok = DataEndpoint {
            port: 7401,
            addrs: vec!["10.0.0.2:7401".into()],
            connections: 2,
        };
        assert!(ok.well_formed());
        for bad in [
            DataEndpoint {
                connections: 0,
                ..ok.clone()
            },
            DataEndpoint {
                connections: MAX_DATA_CONNECTIONS + 1,
                ..ok.clone()
            },
            DataEndpoint {
                addrs: vec![String::new()],
                ..ok.clone()
            },
            DataEndpoint {
                addrs: vec!["x".repeat(MAX_DATA_ADDR_LEN + 1)],
                ..ok.clone()
            },
            DataEndpoint {
                addrs: vec!["a:1".into(); MAX_DATA_ADDRS + 1],
                ..ok
            },
        ] {
            assert!(!bad.well_formed(), "{bad:?}");
        }
    }
}
