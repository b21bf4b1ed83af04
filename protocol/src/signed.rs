//! `Signed<T>`: the one envelope for every signed object.
//!
//! ```text
//! Signed<T> = { bytes: postcard(T), signer: NodeId, signature }
//! signature = ed25519(signer, len(DOMAIN) || DOMAIN || bytes)
//! ```
//!
//! `DOMAIN` names the type and the protocol version (`"drift/load-report/v1"`), so a signature
//! made over one type can never be replayed as another, nor across protocol versions.
//! [`Signed::verify`] checks the signature strictly and then decodes `T`, rejecting trailing
//! bytes; callers then check that the signer has the authority the object claims.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::ids::{Hash, NodeId};
use crate::keys::{SecretKey, Signature};

/// A type that is signed as a whole.
pub trait Signable: Serialize + DeserializeOwned {
    /// The domain tag: the type's name and protocol version. Distinct for every type.
    const DOMAIN: &'static str;

    /// Decodes a payload whose signature verified. A type with more than one encoding (a
    /// layout of an earlier version still read) says how to tell them apart.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode_payload(bytes)
    }
}

/// Why a signed object was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed by {got}, expected {expected}")]
    WrongSigner { expected: NodeId, got: NodeId },
    // Not `#[from]`: a source would be printed a second time by `{:#}`.
    #[error("signed payload is malformed: {0}")]
    Malformed(DecodeError),
}

impl From<DecodeError> for VerifyError {
    fn from(e: DecodeError) -> Self {
        VerifyError::Malformed(e)
    }
}

/// A value of type `T`, encoded, with its signer and signature.
///
/// The encoded bytes are kept as received, so re-encoding never changes what was signed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
    signer: NodeId,
    signature: Signature,
    #[serde(skip)]
    _type: PhantomData<fn() -> T>,
}

fn signing_input(domain: &str, bytes: &[u8]) -> Vec<u8> {
    let tag = domain.as_bytes();
    debug_assert!(tag.len() < 256);
    let mut msg = Vec::with_capacity(1 + tag.len() + bytes.len());
    msg.push(tag.len() as u8);
    msg.extend_from_slice(tag);
    msg.extend_from_slice(bytes);
    msg
}

impl<T: Signable> Signed<T> {
    /// Encodes and signs `value` with `key`.
    pub fn sign(value: &T, key: &SecretKey) -> Self {
        let bytes = codec::encode_payload(value);
        let signature = key.sign_raw(&signing_input(T::DOMAIN, &bytes));
        Self {
            bytes,
            signer: key.public(),
            signature,
            _type: PhantomData,
        }
    }

    /// Verifies the signature strictly, then decodes the value (no trailing bytes allowed).
    /// Says nothing about whether the signer may sign such a value: check that next.
    pub fn verify(&self) -> Result<T, VerifyError> {
        if !self
            .signer
            .verify_raw(&signing_input(T::DOMAIN, &self.bytes), &self.signature)
        {
            return Err(VerifyError::BadSignature);
        }
        Ok(T::decode(&self.bytes)?)
    }

    /// Decodes the payload without checking any signature: for display and for tools that
    /// check signatures themselves ([`Signed::verifies_for`]).
    pub fn decode_unverified(&self) -> Result<T, DecodeError> {
        T::decode(&self.bytes)
    }

    /// Another signature over the same payload, by `key`: how several signers endorse one
    /// value (a roster's admins) without changing its bytes or its hash.
    pub fn cosign(&self, key: &SecretKey) -> Signature {
        key.sign_raw(&signing_input(T::DOMAIN, &self.bytes))
    }

    /// Whether `signature` is `signer`'s signature over this payload (the envelope's own, or
    /// one made by [`Signed::cosign`]).
    pub fn verifies_for(&self, signer: &NodeId, signature: &Signature) -> bool {
        signer.verify_raw(&signing_input(T::DOMAIN, &self.bytes), signature)
    }

    /// The envelope's own signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// [`Signed::verify`], and the signer must be `expected`.
    pub fn verify_by(&self, expected: &NodeId) -> Result<T, VerifyError> {
        if &self.signer != expected {
            return Err(VerifyError::WrongSigner {
                expected: *expected,
                got: self.signer,
            });
        }
        self.verify()
    }

    /// Who claims to have signed this. Unverified until [`Signed::verify`] succeeds.
    pub fn signer(&self) -> &NodeId {
        &self.signer
    }

    /// The signed payload bytes (postcard of `T`).
    pub fn payload(&self) -> &[u8] {
        &self.bytes
    }

    /// blake3 of the whole envelope (payload, signer and signature): how other messages and
    /// chain links refer to this object.
    pub fn hash(&self) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(T::DOMAIN.as_bytes());
        h.update(&(self.bytes.len() as u64).to_le_bytes());
        h.update(&self.bytes);
        h.update(self.signer.as_bytes());
        h.update(&self.signature.0);
        h.finalize().into()
    }

    /// Rebuilds an envelope from its parts (for tests and tools that need to tamper with one).
    pub fn from_parts(bytes: Vec<u8>, signer: NodeId, signature: Signature) -> Self {
        Self {
            bytes,
            signer,
            signature,
            _type: PhantomData,
        }
    }

    /// The envelope's parts.
    pub fn into_parts(self) -> (Vec<u8>, NodeId, Signature) {
        (self.bytes, self.signer, self.signature)
    }
}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.bytes.len())
            .field("signer", &self.signer)
            .finish()
    }
}

/// Every domain tag in use. A test checks they are distinct.
pub const DOMAINS: &[&str] = &[
    crate::report::LoadReport::DOMAIN,
    crate::roster::Roster::DOMAIN,
    crate::migration::MigrationOffer::DOMAIN,
    crate::migration::MigrationDecision::DOMAIN,
    crate::migration::ResolveQuery::DOMAIN,
    crate::migration::ResolveAnswer::DOMAIN,
    crate::transfer::Complete::DOMAIN,
    crate::transfer::Commit::DOMAIN,
    crate::audit::AuditRecord::DOMAIN,
    crate::dataplane::DataBinding::DOMAIN,
    crate::transfer::recover::RecoverRequest::DOMAIN,
    crate::transfer::recover::RecoverAnswer::DOMAIN,
    crate::witness::AuditHead::DOMAIN,
    crate::witness::Countersign::DOMAIN,
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn domain_tags_are_distinct_and_versioned() {
        let set: HashSet<_> = DOMAINS.iter().collect();
        assert_eq!(set.len(), DOMAINS.len());
        for d in DOMAINS {
            assert!(d.starts_with("drift/") && d.contains("/v"), "{d}");
        }
    }
}
