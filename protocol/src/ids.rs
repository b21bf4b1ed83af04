//! Identifiers: nodes, VMs, migrations, and blake3 hashes.
//!
//! Text forms are for people and config files (base58 for keys, hex for the rest); binary forms
//! are raw bytes. Every id has a `short()` form for logs.

use std::fmt;
use std::str::FromStr;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Ids serialize as their text form in human-readable formats (TOML, JSON) and as raw bytes in
/// binary ones (postcard), like iroh's base types.
macro_rules! text_or_bytes {
    ($name:ident, $n:literal) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    self.0.serialize(s)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    let bytes = <[u8; $n]>::deserialize(d)?;
                    Self::try_from_raw(bytes).map_err(serde::de::Error::custom)
                }
            }
        }
    };
}

/// A text id that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdParseError {
    #[error("not valid base58")]
    Base58,
    #[error("not valid hex")]
    Hex,
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("not a valid ed25519 public key")]
    NotAKey,
}

/// A node's identity: its ed25519 public key. The same key is the node's libp2p identity, so
/// the Noise handshake authenticates exactly the key that signs the node's reports.
///
/// Printed as base58 (about 44 characters); [`NodeId::short`] gives the first 8 for logs.
/// The cluster admin key is printed the same way.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; 32]);

text_or_bytes!(NodeId, 32);

impl NodeId {
    /// Wraps raw public key bytes after checking they decode to a curve point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdParseError> {
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| IdParseError::NotAKey)?;
        Ok(Self(bytes))
    }

    fn try_from_raw(bytes: [u8; 32]) -> Result<Self, IdParseError> {
        Self::from_bytes(bytes)
    }

    /// The raw 32 bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 characters of the text form, for logs.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(8);
        s
    }

    pub(crate) fn verifying_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        let n = bs58::decode(s.trim())
            .onto(&mut out[..])
            .map_err(|e| match e {
                bs58::decode::Error::BufferTooSmall => IdParseError::Length {
                    expected: 32,
                    got: 33,
                },
                _ => IdParseError::Base58,
            })?;
        if n != 32 {
            return Err(IdParseError::Length {
                expected: 32,
                got: n,
            });
        }
        Self::from_bytes(out)
    }
}

macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 16]);

        text_or_bytes!($name, 16);

        impl $name {
            /// A fresh random id.
            pub fn random(rng: &mut impl CryptoRngCore) -> Self {
                let mut b = [0u8; 16];
                rng.fill_bytes(&mut b);
                Self(b)
            }

            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            fn try_from_raw(bytes: [u8; 16]) -> Result<Self, IdParseError> {
                Ok(Self(bytes))
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// The first 8 hex characters, for logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 16];
                let s = s.trim();
                if s.len() != 32 {
                    return Err(IdParseError::Length { expected: 16, got: s.len() / 2 });
                }
                hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError::Hex)?;
                Ok(Self(out))
            }
        }
    };
}

random_id!(
    /// A VM's identity, random 128 bits, stable across migrations.
    VmId
);
random_id!(
    /// One migration attempt, random 128 bits, chosen by the source.
    MigrationId
);

/// A blake3 hash. Printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

text_or_bytes!(Hash, 32);

impl Hash {
    /// The all-zero hash: the "previous" hash of the first record of a chain.
    pub const ZERO: Hash = Hash([0u8; 32]);

    fn try_from_raw(bytes: [u8; 32]) -> Result<Self, IdParseError> {
        Ok(Self(bytes))
    }

    /// blake3 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The first 8 hex characters, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl FromStr for Hash {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        let s = s.trim();
        if s.len() != 64 {
            return Err(IdParseError::Length {
                expected: 32,
                got: s.len() / 2,
            });
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| IdParseError::Hex)?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use rand::SeedableRng;

    #[test]
    fn node_id_text_round_trip_and_rejects_garbage() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let id = SecretKey::generate(&mut rng).public();
        let text = id.to_string();
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert!(text.starts_with(&id.short()));
        assert_eq!("0OIl".parse::<NodeId>(), Err(IdParseError::Base58));
        assert!(matches!(
            "abc".parse::<NodeId>(),
            Err(IdParseError::Length { .. })
        ));
    }

    #[test]
    fn random_ids_round_trip() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let vm = VmId::random(&mut rng);
        assert_eq!(vm.to_string().parse::<VmId>().unwrap(), vm);
        let m = MigrationId::random(&mut rng);
        assert_eq!(m.to_string().parse::<MigrationId>().unwrap(), m);
        assert_ne!(vm.as_bytes(), m.as_bytes());
        assert_eq!("zz".repeat(16).parse::<VmId>(), Err(IdParseError::Hex));
        let h = Hash::of(b"drift");
        assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
    }
}
