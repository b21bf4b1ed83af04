//! An epoch's roster with every admin signature it gathered.
//!
//! The first admin signs the roster into a [`Signed<Roster>`] (its payload, signer and
//! signature fix the epoch's hash, which the next epoch links to); the other admins each add an
//! [`Endorsement`]: their signature over the same payload under the same domain tag. Admins
//! sign on their own machines, in any order; adding a signature never changes the hash.
//!
//! ```text
//! Endorsed = { signed: Signed<Roster>, more: [Endorsement] }    (more: at most MAX_ADMINS)
//! file     = frame(Signed<Roster>)   when `more` is empty (the layout of earlier versions)
//!          | frame(Endorsed)         otherwise
//! ```

use serde::{Deserialize, Serialize};

use super::{Admins, Roster, MAX_ADMINS};
use crate::codec::{encode_frame, DecodeError, FrameDecoder};
use crate::ids::{Hash, NodeId};
use crate::keys::{SecretKey, Signature};
use crate::signed::{Signed, VerifyError};

/// One more admin's signature over an epoch's roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    pub admin: NodeId,
    pub signature: Signature,
}

/// A roster epoch and its admins' signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsed {
    /// The roster as the first admin signed it.
    pub signed: Signed<Roster>,
    /// The signatures other admins added.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ADMINS>")]
    pub more: Vec<Endorsement>,
}

impl From<Signed<Roster>> for Endorsed {
    fn from(signed: Signed<Roster>) -> Self {
        Self {
            signed,
            more: Vec::new(),
        }
    }
}

impl Endorsed {
    /// Signs `roster` as its first admin.
    pub fn sign(roster: &Roster, key: &SecretKey) -> Self {
        Signed::sign(roster, key).into()
    }

    /// Adds `key`'s signature (replacing an earlier one by the same key). Fails only when the
    /// epoch already carries [`MAX_ADMINS`] signatures.
    pub fn endorse(&mut self, key: &SecretKey) -> Result<(), EndorseError> {
        let admin = key.public();
        if self.signed.signer() == &admin {
            return Ok(());
        }
        self.more.retain(|e| e.admin != admin);
        if self.more.len() + 1 >= MAX_ADMINS {
            return Err(EndorseError::Full);
        }
        self.more.push(Endorsement {
            admin,
            signature: self.signed.cosign(key),
        });
        Ok(())
    }

    /// The epoch's hash: the first admin's signed roster, whatever was added to it.
    pub fn hash(&self) -> Hash {
        self.signed.hash()
    }

    /// Every key that claims a signature, first signer first (unverified).
    pub fn claimed_signers(&self) -> impl Iterator<Item = &NodeId> {
        std::iter::once(self.signed.signer()).chain(self.more.iter().map(|e| &e.admin))
    }

    /// The distinct keys whose signatures verify, in order.
    pub fn valid_signers(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        let first = (*self.signed.signer(), *self.signed.signature());
        let rest = self.more.iter().map(|e| (e.admin, e.signature));
        for (admin, signature) in std::iter::once(first).chain(rest) {
            if !out.contains(&admin) && self.signed.verifies_for(&admin, &signature) {
                out.push(admin);
            }
        }
        out
    }

    /// Checks that at least `admins.threshold` of `admins.keys` signed, and decodes the roster.
    pub fn verify_by(&self, admins: &Admins) -> Result<Roster, super::RosterError> {
        let valid = self.valid_signers();
        let have = valid.iter().filter(|k| admins.keys.contains(k)).count();
        if have < usize::from(admins.threshold) || admins.threshold == 0 {
            let signed_by: Vec<String> = valid
                .iter()
                .filter(|k| admins.keys.contains(k))
                .map(|k| k.short())
                .collect();
            return Err(super::RosterError::TooFewSignatures {
                have,
                need: admins.threshold,
                of: admins.keys.len(),
                signed_by: if signed_by.is_empty() {
                    "none".into()
                } else {
                    signed_by.join(", ")
                },
            });
        }
        Ok(self
            .signed
            .decode_unverified()
            .map_err(VerifyError::Malformed)?)
    }

    /// The file (and admin API) encoding: the layout of earlier versions when no admin added a
    /// signature.
    pub fn encode_frame(&self) -> Vec<u8> {
        if self.more.is_empty() {
            encode_frame(&self.signed)
        } else {
            encode_frame(self)
        }
    }

    /// Reads either layout of [`Endorsed::encode_frame`] from one whole frame. Signatures are
    /// not checked.
    pub fn decode_frame(decoder: &FrameDecoder, bytes: &[u8]) -> Result<Self, DecodeError> {
        match decoder.decode_exact::<Endorsed>(bytes) {
            Ok(e) if !e.more.is_empty() => Ok(e),
            Ok(_) => Err(DecodeError::NotCanonical),
            Err(full) => decoder
                .decode_exact::<Signed<Roster>>(bytes)
                .map(Endorsed::from)
                .map_err(|_| full),
        }
    }
}

/// Why a signature could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndorseError {
    #[error("the roster already carries {MAX_ADMINS} signatures")]
    Full,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MAX_FRAME_LEN;
    use crate::time::Timestamp;
    use rand::SeedableRng;

    fn roster(admins: Option<Admins>) -> Roster {
        Roster {
            cluster: "lab".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(10),
            members: vec![],
            admins,
        }
    }

    #[test]
    fn signatures_add_up_without_changing_the_hash() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let keys: Vec<SecretKey> = (0..3).map(|_| SecretKey::generate(&mut rng)).collect();
        let admins = Admins {
            keys: keys.iter().map(|k| k.public()).collect(),
            threshold: 2,
        };
        let mut e = Endorsed::sign(&roster(Some(admins.clone())), &keys[0]);
        let hash = e.hash();
        assert!(matches!(
            e.verify_by(&admins),
            Err(super::super::RosterError::TooFewSignatures {
                have: 1,
                need: 2,
                ..
            })
        ));
        e.endorse(&keys[2]).unwrap();
        e.endorse(&keys[2]).unwrap();
        assert_eq!(
            e.more.len(),
            1,
            "a second signature by one key replaces the first"
        );
        assert_eq!(e.hash(), hash);
        assert_eq!(e.verify_by(&admins).unwrap().admins, Some(admins.clone()));
        // A forged endorsement does not count.
        let mut forged = Endorsed::sign(&roster(Some(admins.clone())), &keys[0]);
        forged.more.push(Endorsement {
            admin: keys[1].public(),
            signature: Signature([7; 64]),
        });
        assert_eq!(forged.valid_signers(), vec![keys[0].public()]);
        assert!(forged.verify_by(&admins).is_err());
    }

    #[test]
    fn files_keep_the_old_layout_until_a_second_admin_signs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let a = SecretKey::generate(&mut rng);
        let b = SecretKey::generate(&mut rng);
        let dec = FrameDecoder::new(MAX_FRAME_LEN);
        let plain = Endorsed::sign(&roster(None), &a);
        let frame = plain.encode_frame();
        assert_eq!(
            frame,
            encode_frame(&plain.signed),
            "one-admin rosters as before"
        );
        assert_eq!(Endorsed::decode_frame(&dec, &frame), Ok(plain.clone()));
        let mut two = plain;
        two.endorse(&b).unwrap();
        let frame = two.encode_frame();
        assert_eq!(Endorsed::decode_frame(&dec, &frame), Ok(two.clone()));
        // The full layout with nothing added is not canonical.
        let empty = encode_frame(&Endorsed {
            signed: two.signed.clone(),
            more: vec![],
        });
        assert!(Endorsed::decode_frame(&dec, &empty).is_err());
        assert!(Endorsed::decode_frame(&dec, &frame[..frame.len() - 3]).is_err());
    }

    #[test]
    fn a_roster_without_admins_encodes_as_before() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let a = SecretKey::generate(&mut rng);
        let r = roster(None);
        let s = Signed::sign(&r, &a);
        #[derive(Serialize)]
        struct Old<'a> {
            cluster: &'a str,
            epoch: u64,
            prev: Option<Hash>,
            not_before: Timestamp,
            not_after: Timestamp,
            members: Vec<super::super::Member>,
        }
        let old = crate::codec::encode_payload(&Old {
            cluster: "lab",
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(10),
            members: vec![],
        });
        assert_eq!(s.payload(), &old[..]);
        assert_eq!(s.verify(), Ok(r));
        // An explicit "no admins" marker is refused: one encoding per roster.
        let mut marked = old.clone();
        marked.push(0);
        let forged = Signed::<Roster>::from_parts(marked, a.public(), Signature([0; 64]));
        assert!(forged.decode_unverified().is_err());
        let with = roster(Some(Admins::single(a.public())));
        assert_eq!(Signed::sign(&with, &a).verify(), Ok(with));
    }
}
