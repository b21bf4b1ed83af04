//! Secret keys and signatures.
//!
//! A [`SecretKey`] is zeroized when dropped and never printed. Signing always goes through a
//! domain tag (see [`crate::signed`]); there is no way to sign raw bytes from outside the crate.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::NodeId;

/// A key that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("secret key must be 32 bytes, got {0}")]
    Length(usize),
    #[error("secret key is not valid hex")]
    Hex,
}

/// An ed25519 secret key (a node's or the cluster admin's). Zeroized on drop.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new key from a cryptographic random source.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self(SigningKey::generate(rng))
    }

    /// A key from its 32-byte seed.
    pub fn from_bytes(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// A key from a slice that must hold exactly the 32-byte seed.
    pub fn from_slice(seed: &[u8]) -> Result<Self, KeyError> {
        let seed: &[u8; 32] = seed.try_into().map_err(|_| KeyError::Length(seed.len()))?;
        Ok(Self::from_bytes(seed))
    }

    /// A key from the hex text of its seed (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let mut seed = Zeroizing::new([0u8; 32]);
        if text.len() != 64 {
            return Err(KeyError::Length(text.len() / 2));
        }
        hex::decode_to_slice(text, &mut seed[..]).map_err(|_| KeyError::Hex)?;
        Ok(Self::from_bytes(&seed))
    }

    /// The 32-byte seed, in a buffer that is zeroized when dropped.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The hex text of the seed, zeroized when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(*self.to_bytes()))
    }

    /// The public half: the node id.
    pub fn public(&self) -> NodeId {
        NodeId::from_bytes(self.0.verifying_key().to_bytes())
            .expect("a signing key's verifying key is a valid point")
    }

    pub(crate) fn sign_raw(&self, msg: &[u8]) -> Signature {
        Signature(self.0.sign(msg).to_bytes())
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(<redacted>, public {})", self.public().short())
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "sig_bytes")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}..)", hex::encode(&self.0[..4]))
    }
}

impl NodeId {
    /// Strict verification (no small-order keys, no malleable signatures).
    pub(crate) fn verify_raw(&self, msg: &[u8], sig: &Signature) -> bool {
        let Some(key) = self.verifying_key() else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        key.verify_strict(msg, &sig).is_ok()
    }
}

/// serde for `[u8; 64]`: serde derives arrays only up to 32 elements.
mod sig_bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(64)?;
        for b in v {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 64], A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(64, V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn debug_never_shows_the_secret() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let key = SecretKey::generate(&mut rng);
        let hex = key.to_hex();
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(hex.as_str()));
        assert!(!dbg.contains(&hex[..16]));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let key = SecretKey::generate(&mut rng);
        let back = SecretKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(back.public(), key.public());
        assert_eq!(
            SecretKey::from_hex("abcd").unwrap_err(),
            KeyError::Length(2)
        );
        assert_eq!(
            SecretKey::from_hex(&"g".repeat(64)).unwrap_err(),
            KeyError::Hex
        );
        assert_eq!(
            SecretKey::from_slice(&[0; 31]).unwrap_err(),
            KeyError::Length(31)
        );
    }
}
