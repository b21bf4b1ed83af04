//! The node's audit log: append-only, every record signed by the node and hash-chained to the
//! one before (see `drift_protocol::audit`).
//!
//! Files in the state directory:
//!
//! - `audit.log`: the records, one codec frame each, appended and flushed to disk (`fsync`)
//!   before `append` returns.
//! - `audit.head`: the anchor `(seq, chain hash)` of the newest record, replaced atomically
//!   after each append. A log that ends before its anchor was cut off; a log whose record at the
//!   anchor's seq hashes differently was rewritten.
//!
//! A crash in the middle of an append leaves at most one partial frame at the end of the log;
//! opening the log cuts it off (the record was never reported written), so the log is always a
//! valid prefix. The anchor lives on the same disk as the log, so it stops accidents and naive
//! edits, not an attacker holding the node's key; the heads the node gossips and its peers
//! countersign and keep (`crate::witness`) are the remedy for that.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use drift_protocol::audit::{chain_hash, next_record, verify_chain, Anchor, ChainError};
use drift_protocol::codec::{encode_frame, FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::{AuditEvent, AuditRecord, DecodeError, Hash, NodeId, SecretKey, Signed};
use serde::{Deserialize, Serialize};

use crate::durable::{write_atomic, Overwrite};

/// The log file's name in the state directory.
pub const LOG_FILE: &str = "audit.log";
/// The anchor file's name in the state directory.
pub const HEAD_FILE: &str = "audit.head";

/// What went wrong with an audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    #[error("audit log {path}: record {index} (at byte {offset}) does not decode: {cause}")]
    Undecodable {
        path: PathBuf,
        index: u64,
        offset: u64,
        cause: DecodeError,
    },
    #[error("audit log {path}: ends in the middle of record {index} (at byte {offset})")]
    PartialTail {
        path: PathBuf,
        index: u64,
        offset: u64,
    },
    #[error("audit log {path}: {cause}")]
    Chain { path: PathBuf, cause: ChainError },
    #[error("audit head {path} is not valid")]
    BadHead { path: PathBuf },
}

/// The anchor file's contents.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Head {
    seq: u64,
    hash: Hash,
}

/// The records of a log file, as read; `partial` is the byte offset of a cut-off last frame.
#[derive(Debug)]
pub struct Contents {
    pub records: Vec<Signed<AuditRecord>>,
    pub partial: Option<u64>,
    /// Length in bytes of the complete records.
    pub valid_len: u64,
}

/// Reads every complete record of a log file. A frame that is complete but does not decode
/// is an error naming it; a cut-off last frame is reported in `partial`.
pub fn read_log(path: &Path) -> Result<Contents, AuditError> {
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        cause: source,
    };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        match decoder.decode::<Signed<AuditRecord>>(&bytes[offset..]) {
            Ok(Some((record, used))) => {
                records.push(record);
                offset += used;
            }
            Ok(None) => {
                return Ok(Contents {
                    records,
                    partial: Some(offset as u64),
                    valid_len: offset as u64,
                })
            }
            Err(source) => {
                return Err(AuditError::Undecodable {
                    path: path.to_owned(),
                    index: records.len() as u64,
                    offset: offset as u64,
                    cause: source,
                })
            }
        }
    }
    Ok(Contents {
        records,
        partial: None,
        valid_len: offset as u64,
    })
}

/// Reads the anchor file next to a log, if there is one.
pub fn read_head(path: &Path) -> Result<Option<Anchor>, AuditError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let head: Head =
                FrameDecoder::new(1024)
                    .decode_exact(&bytes)
                    .map_err(|_| AuditError::BadHead {
                        path: path.to_owned(),
                    })?;
            Ok(Some((head.seq, head.hash)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuditError::Io {
            path: path.to_owned(),
            cause: source,
        }),
    }
}

/// Verifies a log file against `node`'s key and, when given, an anchor. A cut-off last frame
/// is reported as an error here (`drift audit verify` is strict; only [`AuditLog::open`]
/// repairs).
pub fn verify_file(
    path: &Path,
    node: &NodeId,
    anchor: Option<Anchor>,
) -> Result<drift_protocol::audit::ChainSummary, AuditError> {
    let contents = read_log(path)?;
    if let Some(offset) = contents.partial {
        return Err(AuditError::PartialTail {
            path: path.to_owned(),
            index: contents.records.len() as u64,
            offset,
        });
    }
    verify_chain(&contents.records, node, anchor).map_err(|source| AuditError::Chain {
        path: path.to_owned(),
        cause: source,
    })
}

/// An open audit log, appending records signed by the node.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    file: File,
    key: SecretKey,
    head: Option<Anchor>,
    /// Bytes of complete records: a failed append is cut back to this.
    len: u64,
}

impl AuditLog {
    /// Opens (or creates) the log in `dir`: cuts off a partial last record, verifies the
    /// whole chain against the node's key and the anchor, and positions for appending.
    pub fn open(dir: &Path, key: SecretKey) -> Result<Self, AuditError> {
        let path = dir.join(LOG_FILE);
        let head_path = dir.join(HEAD_FILE);
        let io_err = |source| AuditError::Io {
            path: path.clone(),
            cause: source,
        };
        let contents = read_log(&path)?;
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        if let Some(offset) = contents.partial {
            tracing::warn!(
                path = %path.display(),
                offset,
                "audit log ends in a partial record (a crash during an append); cutting it off"
            );
            file.set_len(contents.valid_len).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
        }
        let anchor = read_head(&head_path)?;
        let summary = verify_chain(&contents.records, &key.public(), anchor).map_err(|source| {
            AuditError::Chain {
                path: path.clone(),
                cause: source,
            }
        })?;
        file.seek(SeekFrom::Start(contents.valid_len))
            .map_err(io_err)?;
        Ok(Self {
            path,
            head_path,
            file,
            key,
            head: summary.head,
            len: contents.valid_len,
        })
    }

    /// Appends one record, flushed to disk before returning, then moves the anchor.
    pub fn append(&mut self, event: AuditEvent) -> Result<Anchor, AuditError> {
        let record = next_record(self.head, crate::clock::now(), event);
        let signed = Signed::sign(&record, &self.key);
        let frame = encode_frame(&signed);
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            cause: source,
        };
        let written = self
            .file
            .write_all(&frame)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no partial record behind: cut back to the last complete one.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(io_err(e));
        }
        self.len += frame.len() as u64;
        let anchor = (record.seq, chain_hash(&signed));
        self.head = Some(anchor);
        let head = encode_frame(&Head {
            seq: anchor.0,
            hash: anchor.1,
        });
        write_atomic(&self.head_path, &head, 0o600, Overwrite::Replace).map_err(|source| {
            AuditError::Io {
                path: self.head_path.clone(),
                cause: source,
            }
        })?;
        Ok(anchor)
    }

    /// Signs `value` with the node's key (the key that signs the log).
    pub fn sign<T: drift_protocol::signed::Signable>(&self, value: &T) -> Signed<T> {
        Signed::sign(value, &self.key)
    }

    /// The newest record's anchor.
    pub fn head(&self) -> Option<Anchor> {
        self.head
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::audit::ChainErrorKind;
    use rand_core::OsRng;

    fn log_with(n: u64) -> (tempfile::TempDir, SecretKey) {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate(&mut OsRng);
        let mut log = AuditLog::open(dir.path(), key.clone()).unwrap();
        for epoch in 0..n {
            log.append(AuditEvent::NodeStarted {
                roster_epoch: epoch,
            })
            .unwrap();
        }
        (dir, key)
    }

    fn frames(path: &Path) -> Vec<Vec<u8>> {
        read_log(path)
            .unwrap()
            .records
            .iter()
            .map(encode_frame)
            .collect()
    }

    fn failing_index(dir: &Path, key: &SecretKey) -> Option<u64> {
        let anchor = read_head(&dir.join(HEAD_FILE)).unwrap();
        match verify_file(&dir.join(LOG_FILE), &key.public(), anchor) {
            Ok(_) => None,
            Err(AuditError::Chain { cause: source, .. }) => Some(source.index),
            Err(AuditError::Undecodable { index, .. }) => Some(index),
            Err(AuditError::PartialTail { index, .. }) => Some(index),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn every_kind_of_edit_is_caught_at_its_record() {
        let (dir, key) = log_with(6);
        let log = dir.path().join(LOG_FILE);
        assert_eq!(failing_index(dir.path(), &key), None);
        let original = std::fs::read(&log).unwrap();
        let fr = frames(&log);
        let starts: Vec<usize> = fr
            .iter()
            .scan(0, |at, f| {
                let s = *at;
                *at += f.len();
                Some(s)
            })
            .collect();

        // Flip one bit inside every record in turn: caught at that record.
        for (i, start) in starts.iter().enumerate() {
            let mut bytes = original.clone();
            bytes[start + fr[i].len() - 3] ^= 0x10;
            std::fs::write(&log, &bytes).unwrap();
            assert_eq!(
                failing_index(dir.path(), &key),
                Some(i as u64),
                "flip in {i}"
            );
        }
        // Delete record 2.
        let without: Vec<u8> = fr
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .flat_map(|(_, f)| f.clone())
            .collect();
        std::fs::write(&log, &without).unwrap();
        assert_eq!(failing_index(dir.path(), &key), Some(2));
        // Swap records 3 and 4.
        let mut swapped = fr.clone();
        swapped.swap(3, 4);
        std::fs::write(&log, swapped.concat()).unwrap();
        assert_eq!(failing_index(dir.path(), &key), Some(3));
        // Truncate to 4 whole records: the anchor says 6 were written.
        std::fs::write(&log, fr[..4].concat()).unwrap();
        let err = verify_file(
            &log,
            &key.public(),
            read_head(&dir.path().join(HEAD_FILE)).unwrap(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, AuditError::Chain { cause: source, .. }
                if source.kind == ChainErrorKind::Truncated { len: 4, anchor_seq: 5 }),
            "{err}"
        );
        // Opening a tampered log refuses to append to it.
        assert!(AuditLog::open(dir.path(), key.clone()).is_err());
        // Restored, it verifies and appends again.
        std::fs::write(&log, &original).unwrap();
        let mut opened = AuditLog::open(dir.path(), key.clone()).unwrap();
        assert_eq!(opened.head().unwrap().0, 5);
        opened
            .append(AuditEvent::NodeStarted { roster_epoch: 9 })
            .unwrap();
        assert_eq!(failing_index(dir.path(), &key), None);
    }

    #[test]
    fn a_crash_mid_append_recovers_to_a_valid_prefix() {
        let (dir, key) = log_with(3);
        let log = dir.path().join(LOG_FILE);
        let whole = std::fs::read(&log).unwrap();
        // A fourth record was being written when the node died: only part of it is on disk.
        let fourth = encode_frame(&Signed::sign(
            &next_record(
                read_head(&dir.path().join(HEAD_FILE)).unwrap(),
                crate::clock::now(),
                AuditEvent::NodeStarted { roster_epoch: 3 },
            ),
            &key,
        ));
        for cut in 1..fourth.len() {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(&fourth[..cut]);
            std::fs::write(&log, &bytes).unwrap();
            // Strict verification names the partial record...
            assert!(matches!(
                verify_file(&log, &key.public(), None),
                Err(AuditError::PartialTail { index: 3, .. })
            ));
            // ...and opening cuts it off and carries on.
            let mut opened = AuditLog::open(dir.path(), key.clone()).unwrap();
            assert_eq!(std::fs::read(&log).unwrap(), whole);
            assert_eq!(opened.head().unwrap().0, 2);
            if cut == fourth.len() - 1 {
                opened
                    .append(AuditEvent::NodeStarted { roster_epoch: 3 })
                    .unwrap();
                assert_eq!(failing_index(dir.path(), &key), None);
            }
        }
    }
}
