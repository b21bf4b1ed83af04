//! Key files and roster files.
//!
//! A key file is text: a comment line naming the public id, then the 32-byte seed in hex. It is
//! created with mode 0600 and refused when group or others may read it, as ssh does.
//!
//! A roster has two forms: the **draft** (TOML, edited with `drift roster add|remove` or by
//! hand, reviewed, kept under version control) and the **signed roster** (one codec frame
//! holding the epoch and its admins' signatures, an [`Endorsed`] roster, made by `drift roster
//! sign` with one admin key and signed further by the other admins the epoch needs, then
//! distributed to every node).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use drift_protocol::codec::{FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::roster::{Admins, Capacity, Endorsed, Member, Role, Roster, RosterError};
use drift_protocol::{DecodeError, KeyError, NodeId, SecretKey, Timestamp};
use serde::{Deserialize, Serialize};

use crate::durable::{write_atomic, Overwrite};

/// What went wrong with a key or roster file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("{path} already exists (use --force to replace it)")]
    Exists { path: PathBuf },
    #[error(
        "key file {path} is accessible by group or others (mode {mode:03o}); \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} does not hold a drift secret key: {cause}")]
    BadKey { path: PathBuf, cause: KeyError },
    #[error("{path} is not a roster draft: {reason}")]
    BadDraft { path: PathBuf, reason: String },
    #[error("{path} is not a signed roster: {cause}")]
    BadSignedRoster { path: PathBuf, cause: DecodeError },
    // Not `#[from]`: a source would be printed a second time.
    #[error("roster is invalid: {0}")]
    Roster(RosterError),
}

impl From<RosterError> for FileError {
    fn from(e: RosterError) -> Self {
        FileError::Roster(e)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        cause: source,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32, overwrite: Overwrite) -> Result<(), FileError> {
    write_atomic(path, bytes, mode, overwrite).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            FileError::Exists {
                path: path.to_owned(),
            }
        } else {
            FileError::Write {
                path: path.to_owned(),
                cause: source,
            }
        }
    })
}

/// Writes `key` to `path` with mode 0600.
pub fn write_key(path: &Path, key: &SecretKey, overwrite: Overwrite) -> Result<(), FileError> {
    let text = zeroize::Zeroizing::new(format!(
        "# drift ed25519 secret key; public id {}\n{}\n",
        key.public(),
        key.to_hex().as_str()
    ));
    write(path, text.as_bytes(), 0o600, overwrite)
}

/// Reads a key file, refusing one that group or others can access.
pub fn read_key(path: &Path) -> Result<SecretKey, FileError> {
    let meta = fs::metadata(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        cause: source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = zeroize::Zeroizing::new(read(path)?);
    let text = std::str::from_utf8(&bytes).map_err(|_| FileError::BadKey {
        path: path.to_owned(),
        cause: KeyError::Hex,
    })?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    SecretKey::from_hex(line).map_err(|source| FileError::BadKey {
        path: path.to_owned(),
        cause: source,
    })
}

/// One member in a roster draft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftMember {
    pub name: String,
    pub id: NodeId,
    #[serde(default = "default_roles")]
    pub roles: Vec<String>,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub mem_mib: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_roles() -> Vec<String> {
    vec!["host".into()]
}

/// The editable form of a roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RosterDraft {
    pub cluster: String,
    /// The admin keys that must sign the next epoch (empty: the nodes' configured admin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<NodeId>,
    /// How many of `admins` must sign the next epoch (default: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    #[serde(default, rename = "member")]
    pub members: Vec<DraftMember>,
}

impl RosterDraft {
    /// The roster this draft describes, at `epoch`, linked to `prev`, valid in the window.
    pub fn to_roster(
        &self,
        epoch: u64,
        prev: Option<drift_protocol::Hash>,
        not_before: Timestamp,
        not_after: Timestamp,
    ) -> Result<Roster, FileError> {
        let members = self
            .members
            .iter()
            .map(|m| {
                Ok(Member {
                    id: m.id,
                    name: m.name.clone(),
                    roles: m
                        .roles
                        .iter()
                        .map(|r| r.parse())
                        .collect::<Result<Vec<Role>, _>>()?,
                    labels: m.labels.clone(),
                    capacity: Capacity {
                        cpus: m.cpus,
                        mem_mib: m.mem_mib,
                    },
                })
            })
            .collect::<Result<Vec<_>, RosterError>>()?;
        let roster = Roster {
            cluster: self.cluster.clone(),
            epoch,
            prev,
            not_before,
            not_after,
            members,
            admins: self.admin_set(),
        };
        roster.check()?;
        Ok(roster)
    }

    /// The admin set the draft names, if any.
    pub fn admin_set(&self) -> Option<Admins> {
        (!self.admins.is_empty() || self.threshold.is_some()).then(|| Admins {
            keys: self.admins.clone(),
            threshold: self.threshold.unwrap_or(1),
        })
    }

    /// The draft form of a signed roster's contents (to edit the next epoch from it).
    pub fn from_roster(roster: &Roster) -> Self {
        Self {
            cluster: roster.cluster.clone(),
            admins: roster
                .admins
                .as_ref()
                .map(|a| a.keys.clone())
                .unwrap_or_default(),
            threshold: roster.admins.as_ref().map(|a| a.threshold),
            members: roster
                .members
                .iter()
                .map(|m| DraftMember {
                    name: m.name.clone(),
                    id: m.id,
                    roles: m.roles.iter().map(ToString::to_string).collect(),
                    cpus: m.capacity.cpus,
                    mem_mib: m.capacity.mem_mib,
                    labels: m.labels.clone(),
                })
                .collect(),
        }
    }
}

/// Reads a roster draft.
pub fn read_draft(path: &Path) -> Result<RosterDraft, FileError> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| FileError::BadDraft {
        path: path.to_owned(),
        reason: "not UTF-8 text".into(),
    })?;
    toml::from_str(text).map_err(|e| FileError::BadDraft {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Writes a roster draft (mode 0644: it holds nothing secret).
pub fn write_draft(
    path: &Path,
    draft: &RosterDraft,
    overwrite: Overwrite,
) -> Result<(), FileError> {
    let text = toml::to_string_pretty(draft).map_err(|e| FileError::BadDraft {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let text = format!(
        "# drift roster draft: edit, then `drift roster sign` it with the admin key.\n{text}"
    );
    write(path, text.as_bytes(), 0o644, overwrite)
}

/// Reads a signed roster file (unverified: verify it against the admins next).
pub fn read_signed_roster(path: &Path) -> Result<Endorsed, FileError> {
    let bytes = read(path)?;
    Endorsed::decode_frame(&FrameDecoder::new(MAX_FRAME_LEN), &bytes).map_err(|source| {
        FileError::BadSignedRoster {
            path: path.to_owned(),
            cause: source,
        }
    })
}

/// Writes a signed roster file.
pub fn write_signed_roster(
    path: &Path,
    roster: &Endorsed,
    overwrite: Overwrite,
) -> Result<(), FileError> {
    write(path, &roster.encode_frame(), 0o644, overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn a_file_error_names_its_cause_once() {
        // `drift` prints errors with `{:#}`, which appends every source in the chain.
        let dir = tempfile::tempdir().unwrap();
        let err = anyhow::Error::from(read_key(&dir.path().join("missing.key")).unwrap_err());
        let shown = format!("{err:#}");
        assert!(shown.contains("missing.key"), "{shown}");
        assert_eq!(shown.matches("os error").count(), 1, "{shown}");
    }

    #[test]
    fn key_files_are_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        let key = SecretKey::generate(&mut OsRng);
        write_key(&p, &key, Overwrite::Refuse).unwrap();
        assert_eq!(read_key(&p).unwrap().public(), key.public());
        assert!(matches!(
            write_key(&p, &key, Overwrite::Refuse),
            Err(FileError::Exists { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_key(&p).unwrap_err();
        assert!(matches!(err, FileError::Permissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
        let bad = dir.path().join("bad.key");
        write(&bad, b"# nothing\nzz\n", 0o600, Overwrite::Refuse).unwrap();
        assert!(matches!(read_key(&bad), Err(FileError::BadKey { .. })));
        assert!(matches!(
            read_key(&dir.path().join("missing")),
            Err(FileError::Read { .. })
        ));
    }

    #[test]
    fn draft_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("roster.toml");
        let id = SecretKey::generate(&mut OsRng).public();
        let draft = RosterDraft {
            cluster: "lab".into(),
            admins: vec![],
            threshold: None,
            members: vec![DraftMember {
                name: "n1".into(),
                id,
                roles: vec!["host".into()],
                cpus: 4,
                mem_mib: 8192,
                labels: BTreeMap::from([("region".into(), "eu".into())]),
            }],
        };
        write_draft(&p, &draft, Overwrite::Refuse).unwrap();
        assert_eq!(read_draft(&p).unwrap(), draft);
        let roster = draft
            .to_roster(1, None, Timestamp(0), Timestamp(10))
            .unwrap();
        assert_eq!(RosterDraft::from_roster(&roster), draft);
        let mut bad = draft;
        bad.members[0].roles = vec!["king".into()];
        assert!(matches!(
            bad.to_roster(1, None, Timestamp(0), Timestamp(10)),
            Err(FileError::Roster(RosterError::UnknownRole(_)))
        ));
    }
}
