//! Verifying an epoch and walking the chain of epochs; the announcement nodes gossip.
//!
//! An epoch is verified against the admins that govern it: for the first roster a node loads,
//! its configured trust anchor; for every later epoch, the admins the epoch before it names
//! (or the anchor, when it names none). [`advance`] walks a gossiped chain forward one epoch at
//! a time, so a node a few epochs behind catches up, and an epoch short of its threshold, or
//! signed by an admin an earlier epoch removed, is refused wherever it arrives.

use serde::{Deserialize, Serialize};

use super::{Admins, Endorsed, Roster, RosterError};
use crate::codec::{encode_frame, DecodeError, FrameDecoder};
use crate::signed::{Signed, VerifyError};
use crate::time::Timestamp;

/// Verifies an epoch on its own: at least `trust.threshold` of `trust.keys` signed it, its
/// structure holds, and (when `now` is given) it is inside its validity window.
pub fn verify(
    endorsed: &Endorsed,
    trust: &Admins,
    now: Option<Timestamp>,
) -> Result<Roster, RosterError> {
    let roster = endorsed.verify_by(trust)?;
    roster.check()?;
    if let Some(now) = now {
        roster.check_time(now)?;
    }
    Ok(roster)
}

/// The admins whose signatures the epoch after `roster` needs.
pub fn governing(roster: &Roster, anchor: &Admins) -> Admins {
    roster.admins.clone().unwrap_or_else(|| anchor.clone())
}

/// Verifies that `next` may replace `current` (already verified): same cluster, the next epoch,
/// linked to `current` by hash, signed by the threshold of `current`'s admins (`anchor` when it
/// names none), valid at `now`.
pub fn verify_successor(
    current: &Endorsed,
    current_roster: &Roster,
    next: &Endorsed,
    anchor: &Admins,
    now: Timestamp,
) -> Result<Roster, RosterError> {
    let roster = verify(next, &governing(current_roster, anchor), Some(now))?;
    if roster.cluster != current_roster.cluster {
        return Err(RosterError::WrongCluster {
            expected: current_roster.cluster.clone(),
            got: roster.cluster,
        });
    }
    if roster.epoch != current_roster.epoch + 1 {
        return Err(RosterError::NotNext {
            current: current_roster.epoch,
            got: roster.epoch,
        });
    }
    let expected = current.hash();
    if roster.prev != Some(expected) {
        return Err(RosterError::ChainMismatch {
            current: current_roster.epoch,
            got: roster.epoch,
            link: roster.prev,
            expected,
        });
    }
    Ok(roster)
}

/// How many consecutive epochs a roster announcement carries at most.
pub const MAX_ANNOUNCED_EPOCHS: usize = 8;

/// What nodes gossip about membership: the newest epochs they hold, oldest first, in
/// consecutive epochs, so a node a few epochs behind can walk the chain forward.
///
/// ```text
/// frame(Vec<Signed<Roster>>)   when no epoch carries more than one signature (the layout
///                              of earlier versions, which they still read)
/// frame(Vec<Endorsed>)         otherwise
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub chain: Vec<Endorsed>,
}

/// The announcement's layout when every epoch carries one signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlainAnnouncement {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ANNOUNCED_EPOCHS>")]
    pub chain: Vec<Signed<Roster>>,
}

/// The announcement's layout when an epoch carries more than one signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndorsedAnnouncement {
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, MAX_ANNOUNCED_EPOCHS>")]
    pub chain: Vec<Endorsed>,
}

impl Announcement {
    /// One frame, in the layout of earlier versions when that loses nothing.
    pub fn encode_frame(&self) -> Vec<u8> {
        if self.chain.iter().all(|e| e.more.is_empty()) {
            encode_frame(&PlainAnnouncement {
                chain: self.chain.iter().map(|e| e.signed.clone()).collect(),
            })
        } else {
            encode_frame(&EndorsedAnnouncement {
                chain: self.chain.clone(),
            })
        }
    }

    /// Reads either layout from one whole frame. Nothing is verified.
    pub fn decode_frame(decoder: &FrameDecoder, bytes: &[u8]) -> Result<Self, DecodeError> {
        match decoder.decode_exact::<PlainAnnouncement>(bytes) {
            Ok(p) => Ok(Self {
                chain: p.chain.into_iter().map(Endorsed::from).collect(),
            }),
            Err(plain) => match decoder.decode_exact::<EndorsedAnnouncement>(bytes) {
                Ok(f) if f.chain.iter().any(|e| !e.more.is_empty()) => Ok(Self { chain: f.chain }),
                Ok(_) => Err(DecodeError::NotCanonical),
                Err(_) => Err(plain),
            },
        }
    }
}

/// The leading fields of an encoded [`Roster`]: enough to skip an epoch already held without
/// decoding (or verifying) the rest.
#[derive(Deserialize)]
struct RosterHead {
    #[allow(dead_code)]
    cluster: String,
    epoch: u64,
}

/// Walks `chain` forward from `current` and returns the verified successors it crossed, in
/// epoch order (empty when nothing in `chain` is newer); the last is the new head. Entries at
/// or below the current epoch are skipped unverified; the first entry that should link but does
/// not is an error.
pub fn advance(
    current: &Endorsed,
    current_roster: &Roster,
    chain: &[Endorsed],
    anchor: &Admins,
    now: Timestamp,
) -> Result<Vec<(Endorsed, Roster)>, RosterError> {
    let mut walked: Vec<(Endorsed, Roster)> = Vec::new();
    for next in chain.iter().take(MAX_ANNOUNCED_EPOCHS) {
        let (cur_signed, cur_roster) = match walked.last() {
            Some((s, r)) => (s, r),
            None => (current, current_roster),
        };
        // Cheap skip of epochs already held: read only the epoch, verify nothing.
        let Ok((claimed, _)) = postcard::take_from_bytes::<RosterHead>(next.signed.payload())
        else {
            return Err(RosterError::Signature(VerifyError::BadSignature));
        };
        if claimed.epoch <= cur_roster.epoch {
            continue;
        }
        let roster = verify_successor(cur_signed, cur_roster, next, anchor, now)?;
        walked.push((next.clone(), roster));
    }
    Ok(walked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Hash;
    use crate::keys::SecretKey;
    use crate::roster::{Capacity, Member, Role};
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    fn member(rng: &mut rand::rngs::StdRng, name: &str) -> Member {
        Member {
            id: SecretKey::generate(rng).public(),
            name: name.into(),
            roles: vec![Role::Host],
            labels: BTreeMap::from([("jurisdiction".into(), "de".into())]),
            capacity: Capacity {
                cpus: 8,
                mem_mib: 16384,
            },
        }
    }

    fn roster(rng: &mut rand::rngs::StdRng) -> Roster {
        Roster {
            cluster: "lab".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(1000),
            not_after: Timestamp(10_000),
            members: vec![member(rng, "a"), member(rng, "b")],
            admins: None,
        }
    }

    fn one(key: &SecretKey) -> Admins {
        Admins::single(key.public())
    }

    #[test]
    fn verify_checks_signer_structure_and_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let admin = SecretKey::generate(&mut rng);
        let other = SecretKey::generate(&mut rng);
        let r = roster(&mut rng);
        let signed = Endorsed::sign(&r, &admin);
        assert_eq!(
            verify(&signed, &one(&admin), Some(Timestamp(2000))),
            Ok(r.clone())
        );
        assert!(matches!(
            verify(&signed, &one(&other), None),
            Err(RosterError::TooFewSignatures {
                have: 0,
                need: 1,
                ..
            })
        ));
        assert_eq!(
            verify(&signed, &one(&admin), Some(Timestamp(10_000))),
            Err(RosterError::Expired(Timestamp(10_000)))
        );
        assert_eq!(
            verify(&signed, &one(&admin), Some(Timestamp(5))),
            Err(RosterError::NotYetValid(Timestamp(1000)))
        );
        let mut dup = r.clone();
        dup.members[1].name = "a".into();
        assert_eq!(
            verify(&Endorsed::sign(&dup, &admin), &one(&admin), None),
            Err(RosterError::DuplicateName("a".into()))
        );
        let mut bad = r.clone();
        bad.members[0].name = "no spaces".into();
        assert!(matches!(bad.check(), Err(RosterError::BadName(_))));
        let mut linked = r;
        linked.prev = Some(Hash::ZERO);
        assert_eq!(linked.check(), Err(RosterError::BadLink));
    }

    #[test]
    fn advance_walks_a_chain_and_stops_at_a_bad_link() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let admin = SecretKey::generate(&mut rng);
        let mut chain = vec![];
        let mut r = roster(&mut rng);
        let mut prev: Option<Endorsed> = None;
        for epoch in 1..=4 {
            r.epoch = epoch;
            r.prev = prev.as_ref().map(|p| p.hash());
            let s = Endorsed::sign(&r, &admin);
            chain.push((s.clone(), r.clone()));
            prev = Some(s);
        }
        let signed: Vec<_> = chain.iter().map(|(s, _)| s.clone()).collect();
        let now = Timestamp(2000);
        let (s1, r1) = &chain[0];
        let walked = advance(s1, r1, &signed, &one(&admin), now).unwrap();
        let epochs: Vec<u64> = walked.iter().map(|(_, r)| r.epoch).collect();
        assert_eq!(epochs, vec![2, 3, 4]);
        assert_eq!(walked[2].0, signed[3]);
        assert_eq!(
            advance(&signed[3], &chain[3].1, &signed, &one(&admin), now),
            Ok(vec![])
        );
        // A gap (epoch 2 missing) cannot be crossed.
        let gap = vec![signed[2].clone(), signed[3].clone()];
        assert!(matches!(
            advance(s1, r1, &gap, &one(&admin), now),
            Err(RosterError::NotNext { current: 1, got: 3 })
        ));
        // A roster signed by someone else is refused.
        let eve = SecretKey::generate(&mut rng);
        let mut forged = chain[1].1.clone();
        forged.members.clear();
        let forged = vec![Endorsed::sign(&forged, &eve)];
        assert!(matches!(
            advance(s1, r1, &forged, &one(&admin), now),
            Err(RosterError::TooFewSignatures { .. })
        ));
    }

    #[test]
    fn successor_must_link_to_current() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        let admin = SecretKey::generate(&mut rng);
        let r1 = roster(&mut rng);
        let s1 = Endorsed::sign(&r1, &admin);
        let mut r2 = r1.clone();
        r2.epoch = 2;
        r2.prev = Some(s1.hash());
        r2.members.pop();
        let s2 = Endorsed::sign(&r2, &admin);
        let now = Timestamp(2000);
        assert_eq!(
            verify_successor(&s1, &r1, &s2, &one(&admin), now),
            Ok(r2.clone())
        );
        let mut forked = r2.clone();
        forked.prev = Some(Hash::of(b"another history"));
        assert!(matches!(
            verify_successor(
                &s1,
                &r1,
                &Endorsed::sign(&forked, &admin),
                &one(&admin),
                now
            ),
            Err(RosterError::ChainMismatch { .. })
        ));
        let mut skip = r2.clone();
        skip.epoch = 3;
        assert_eq!(
            verify_successor(&s1, &r1, &Endorsed::sign(&skip, &admin), &one(&admin), now),
            Err(RosterError::NotNext { current: 1, got: 3 })
        );
        let mut other_cluster = r2;
        other_cluster.cluster = "prod".into();
        assert!(matches!(
            verify_successor(
                &s1,
                &r1,
                &Endorsed::sign(&other_cluster, &admin),
                &one(&admin),
                now
            ),
            Err(RosterError::WrongCluster { .. })
        ));
    }

    /// Three admins, two needed: the acceptance rules of k-of-n rosters.
    #[test]
    fn k_of_n_epochs_need_the_previous_epochs_threshold() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let keys: Vec<SecretKey> = (0..4).map(|_| SecretKey::generate(&mut rng)).collect();
        let anchor = one(&keys[0]);
        let three = Admins {
            keys: keys[..3].iter().map(|k| k.public()).collect(),
            threshold: 2,
        };
        let now = Timestamp(2000);
        // Epoch 1, no admins named: the anchor governs epoch 2, which introduces 2 of 3.
        let r1 = roster(&mut rng);
        let e1 = Endorsed::sign(&r1, &keys[0]);
        let mut r2 = r1.clone();
        r2.epoch = 2;
        r2.prev = Some(e1.hash());
        r2.admins = Some(three.clone());
        let e2 = Endorsed::sign(&r2, &keys[0]);
        assert_eq!(
            verify_successor(&e1, &r1, &e2, &anchor, now),
            Ok(r2.clone())
        );

        // Epoch 3 removes admin 1 and names {0, 2, 3}, 2 of 3.
        let mut r3 = r2.clone();
        r3.epoch = 3;
        r3.prev = Some(e2.hash());
        r3.admins = Some(Admins {
            keys: vec![keys[0].public(), keys[2].public(), keys[3].public()],
            threshold: 2,
        });
        // k - 1 signatures: refused.
        let short = Endorsed::sign(&r3, &keys[1]);
        assert!(matches!(
            verify_successor(&e2, &r2, &short, &anchor, now),
            Err(RosterError::TooFewSignatures {
                have: 1,
                need: 2,
                of: 3,
                ..
            })
        ));
        // The anchor alone no longer governs once an epoch names admins.
        assert!(verify_successor(&e2, &r2, &Endorsed::sign(&r3, &keys[0]), &anchor, now).is_err());
        // A key the previous epoch does not name does not count (the new admin 3 signing its
        // own admission).
        let mut self_made = Endorsed::sign(&r3, &keys[1]);
        self_made.endorse(&keys[3]).unwrap();
        assert!(verify_successor(&e2, &r2, &self_made, &anchor, now).is_err());
        // k signatures, in any order: adopted, and the hash is the first signer's.
        let mut e3 = Endorsed::sign(&r3, &keys[2]);
        e3.endorse(&keys[1]).unwrap();
        assert_eq!(
            verify_successor(&e2, &r2, &e3, &anchor, now),
            Ok(r3.clone())
        );

        // Epoch 4: the removed admin 1 can no longer sign; 0 and 3 can.
        let mut r4 = r3.clone();
        r4.epoch = 4;
        r4.prev = Some(e3.hash());
        let mut by_removed = Endorsed::sign(&r4, &keys[1]);
        by_removed.endorse(&keys[0]).unwrap();
        assert!(matches!(
            verify_successor(&e3, &r3, &by_removed, &anchor, now),
            Err(RosterError::TooFewSignatures { have: 1, .. })
        ));
        let mut e4 = Endorsed::sign(&r4, &keys[3]);
        e4.endorse(&keys[0]).unwrap();
        assert_eq!(
            verify_successor(&e3, &r3, &e4, &anchor, now),
            Ok(r4.clone())
        );

        // The chain walks from epoch 1 with the right signatures, and stops at a skipped epoch
        // or at a swap of admins without the threshold.
        let chain = vec![e2.clone(), e3.clone(), e4.clone()];
        let walked = advance(&e1, &r1, &chain, &anchor, now).unwrap();
        assert_eq!(
            walked.iter().map(|(_, r)| r.epoch).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        // (epoch 4 is also signed by admins epoch 2 does not name: refused either way)
        assert!(matches!(
            advance(&e1, &r1, &[e2.clone(), e4.clone()], &anchor, now),
            Err(RosterError::NotNext { current: 2, got: 4 })
                | Err(RosterError::TooFewSignatures { .. })
        ));
        let mut swap = r3.clone();
        swap.admins = Some(Admins {
            keys: vec![keys[1].public()],
            threshold: 1,
        });
        let swap = Endorsed::sign(&swap, &keys[1]);
        assert!(advance(&e1, &r1, &[e2, swap], &anchor, now).is_err());
    }

    #[test]
    fn admin_sets_are_checked() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let a = SecretKey::generate(&mut rng).public();
        let b = SecretKey::generate(&mut rng).public();
        let ok = Admins {
            keys: vec![a, b],
            threshold: 2,
        };
        assert_eq!(ok.check(), Ok(()));
        for bad in [
            Admins {
                keys: vec![a, b],
                threshold: 3,
            },
            Admins {
                keys: vec![a, b],
                threshold: 0,
            },
            Admins {
                keys: vec![a, a],
                threshold: 1,
            },
            Admins {
                keys: vec![],
                threshold: 1,
            },
        ] {
            assert!(
                matches!(bad.check(), Err(RosterError::BadAdmins(_))),
                "{bad:?}"
            );
        }
        let mut r = roster(&mut rng);
        r.admins = Some(Admins {
            keys: vec![a],
            threshold: 2,
        });
        assert!(matches!(r.check(), Err(RosterError::BadAdmins(_))));
    }

    #[test]
    fn announcements_keep_the_old_layout_until_an_epoch_has_two_signatures() {
        use crate::codec::MAX_FRAME_LEN;
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        let a = SecretKey::generate(&mut rng);
        let b = SecretKey::generate(&mut rng);
        let dec = FrameDecoder::new(MAX_FRAME_LEN);
        let e = Endorsed::sign(&roster(&mut rng), &a);
        let plain = Announcement {
            chain: vec![e.clone()],
        };
        let frame = plain.encode_frame();
        assert_eq!(
            frame,
            encode_frame(&PlainAnnouncement {
                chain: vec![e.signed.clone()]
            })
        );
        assert_eq!(Announcement::decode_frame(&dec, &frame), Ok(plain));
        let mut two = e;
        two.endorse(&b).unwrap();
        let full = Announcement { chain: vec![two] };
        assert_eq!(
            Announcement::decode_frame(&dec, &full.encode_frame()),
            Ok(full)
        );
        assert!(Announcement::decode_frame(&dec, &[0, 0, 0, 1, 9]).is_err());
    }
}
