//! Load reports: what each host gossips about itself.
//!
//! A host signs a [`LoadReport`] every interval and publishes it (as one frame holding a
//! `Signed<LoadReport>`) on the gossip topic. Every receiver runs [`validate`] before the
//! report may enter its table or be forwarded; the verdict says why a report was refused and
//! whether the sender misbehaved ([`Rejection::is_misbehaviour`]) or merely delivered something
//! late ([`Rejection::Stale`] and friends), which maps onto gossipsub's Reject / Ignore.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, FrameDecoder};
use crate::ids::NodeId;
use crate::roster::{Role, Roster};
use crate::signed::{Signable, Signed, VerifyError};
use crate::time::Timestamp;

/// The largest encoded report frame accepted. A report encodes to well under 200 bytes.
pub const MAX_REPORT_LEN: usize = 512;

/// CPU figures are in permille of the host's capacity (1000 = all logical CPUs busy).
pub const PERMILLE: u32 = 1000;

/// Demand and reservations may exceed capacity (overcommit), up to this many permille.
pub const MAX_DEMAND_PERMILLE: u32 = 100 * PERMILLE;

/// Power draw above this many milliwatts (100 kW) is not a believable host.
pub const MAX_POWER_MW: u64 = 100_000_000;

/// Memory above this many MiB (1 PiB) is not a believable host.
pub const MAX_MEM_MIB: u64 = 1 << 30;

/// One host's load at one instant, signed by that host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The subject: must equal the signer.
    pub node: NodeId,
    /// Grows by at least one with every report of this node (the receiver keeps the newest).
    pub seq: u64,
    pub issued_at: Timestamp,
    /// The roster epoch the node runs under.
    pub roster_epoch: u64,
    /// Host CPU utilization, permille (0..=1000).
    pub cpu_permille: u16,
    pub mem_used_mib: u64,
    pub mem_total_mib: u64,
    /// Power draw in milliwatts (measured by RAPL, or modelled; see `power_measured`).
    pub power_mw: u64,
    /// Whether `power_mw` was measured (true) or modelled from utilization (false).
    pub power_measured: bool,
    /// VMs running on the host.
    pub vm_count: u32,
    /// The VMs' CPU demand, permille of host capacity (may exceed 1000 when overcommitted).
    pub vm_demand_permille: u32,
    /// CPU reserved for accepted incoming migrations, permille of host capacity.
    pub reserved_permille: u32,
    /// The host drained its VMs to consolidate and sleeps: it takes VMs only when no active
    /// host can (see [`crate::policy::consolidate`]).
    pub standby: bool,
}

impl Signable for LoadReport {
    const DOMAIN: &'static str = "drift/load-report/v1";
}

/// Time bounds for accepting a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Reports issued longer ago than this are refused as too old.
    pub max_age_ms: u64,
    /// Reports issued further in the future than this (clock skew) are refused.
    pub max_skew_ms: u64,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            max_age_ms: 30_000,
            max_skew_ms: 5_000,
        }
    }
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("report of {len} bytes exceeds {max}")]
    Oversized { len: usize, max: usize },
    #[error("undecodable: {0}")]
    Malformed(DecodeError),
    #[error("bad signature")]
    BadSignature,
    #[error("signer {0:?} is not a roster member")]
    UnknownSigner(NodeId),
    #[error("signer {0:?} is not a host")]
    NotAHost(NodeId),
    #[error("signed by {signer:?} about {subject:?}")]
    SignerNotSubject { signer: NodeId, subject: NodeId },
    #[error("seq {got} is not newer than {newest}")]
    Stale { newest: u64, got: u64 },
    /// `node` signed it (verified): its clock, or this host's, is off.
    #[error("issued {age_ms} ms ago")]
    TooOld { node: NodeId, age_ms: u64 },
    /// `node` signed it (verified): its clock, or this host's, is off.
    #[error("issued {ahead_ms} ms in the future")]
    FromFuture { node: NodeId, ahead_ms: u64 },
    #[error("{field} is out of range")]
    OutOfRange { field: &'static str },
}

impl Rejection {
    /// A stable, short label for counters and the API.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Oversized { .. } => "oversized",
            Rejection::Malformed(_) => "malformed",
            Rejection::BadSignature => "bad_signature",
            Rejection::UnknownSigner(_) => "unknown_signer",
            Rejection::NotAHost(_) => "not_a_host",
            Rejection::SignerNotSubject { .. } => "signer_not_subject",
            Rejection::Stale { .. } => "stale_seq",
            Rejection::TooOld { .. } => "too_old",
            Rejection::FromFuture { .. } => "from_future",
            Rejection::OutOfRange { .. } => "out_of_range",
        }
    }

    /// Every label, in a fixed order (for zero-filled counters).
    pub const LABELS: [&'static str; 10] = [
        "oversized",
        "malformed",
        "bad_signature",
        "unknown_signer",
        "not_a_host",
        "signer_not_subject",
        "stale_seq",
        "too_old",
        "from_future",
        "out_of_range",
    ];

    /// Whether whoever forwarded this broke the rules (gossipsub `Reject`, which lowers its
    /// score), as opposed to delivering something an honest relay could have delivered
    /// (`Ignore`): an old report late, or a report of a member this node's roster does not
    /// know yet (or no longer) while a roster change spreads. An honest relay can never
    /// deliver a forged, malformed, oversized or out-of-range report.
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(
            self,
            Rejection::Stale { .. }
                | Rejection::TooOld { .. }
                | Rejection::FromFuture { .. }
                | Rejection::UnknownSigner(_)
                | Rejection::NotAHost(_)
        )
    }
}

impl LoadReport {
    /// Range checks that need no context.
    pub fn check_ranges(&self) -> Result<(), Rejection> {
        let out = |field| Err(Rejection::OutOfRange { field });
        if u32::from(self.cpu_permille) > PERMILLE {
            return out("cpu_permille");
        }
        if self.mem_total_mib > MAX_MEM_MIB {
            return out("mem_total_mib");
        }
        if self.mem_used_mib > self.mem_total_mib {
            return out("mem_used_mib");
        }
        if self.power_mw > MAX_POWER_MW {
            return out("power_mw");
        }
        if self.vm_demand_permille > MAX_DEMAND_PERMILLE {
            return out("vm_demand_permille");
        }
        if self.reserved_permille > MAX_DEMAND_PERMILLE {
            return out("reserved_permille");
        }
        if self.seq == 0 {
            return out("seq");
        }
        Ok(())
    }
}

/// Everything [`validate`] needs to judge a report.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub now: Timestamp,
    /// The roster in force.
    pub roster: &'a Roster,
    pub freshness: Freshness,
}

/// Validates the bytes of a gossiped report: size, frame, roster membership of the signer,
/// strict signature, signer = subject, value ranges, time. `newest_seq` is the newest seq
/// already held for the subject, looked up once the subject is known.
///
/// Cheap checks run first, so a flood of junk costs no signature verification.
pub fn validate(
    bytes: &[u8],
    ctx: &Context<'_>,
    newest_seq: impl FnOnce(&NodeId) -> Option<u64>,
) -> Result<(Signed<LoadReport>, LoadReport), Rejection> {
    if bytes.len() > MAX_REPORT_LEN {
        return Err(Rejection::Oversized {
            len: bytes.len(),
            max: MAX_REPORT_LEN,
        });
    }
    let signed: Signed<LoadReport> = FrameDecoder::new(MAX_REPORT_LEN)
        .decode_exact(bytes)
        .map_err(Rejection::Malformed)?;
    let signer = *signed.signer();
    let member = ctx
        .roster
        .member(&signer)
        .ok_or(Rejection::UnknownSigner(signer))?;
    if !member.has_role(Role::Host) {
        return Err(Rejection::NotAHost(signer));
    }
    let report = signed.verify().map_err(|e| match e {
        VerifyError::Malformed(d) => Rejection::Malformed(d),
        _ => Rejection::BadSignature,
    })?;
    if report.node != signer {
        return Err(Rejection::SignerNotSubject {
            signer,
            subject: report.node,
        });
    }
    report.check_ranges()?;
    if report.issued_at > ctx.now {
        let ahead_ms = report.issued_at.millis_since(ctx.now);
        if ahead_ms > ctx.freshness.max_skew_ms {
            return Err(Rejection::FromFuture {
                node: signer,
                ahead_ms,
            });
        }
    }
    let age_ms = ctx.now.millis_since(report.issued_at);
    if age_ms > ctx.freshness.max_age_ms {
        return Err(Rejection::TooOld {
            node: signer,
            age_ms,
        });
    }
    if let Some(newest) = newest_seq(&signer) {
        if report.seq <= newest {
            return Err(Rejection::Stale {
                newest,
                got: report.seq,
            });
        }
    }
    Ok((signed, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_frame;
    use crate::keys::SecretKey;
    use crate::roster::{Capacity, Member};
    use rand::SeedableRng;
    use std::collections::BTreeMap;

    struct Fixture {
        host: SecretKey,
        outsider: SecretKey,
        observer: SecretKey,
        roster: Roster,
    }

    fn fixture() -> Fixture {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let host = SecretKey::generate(&mut rng);
        let outsider = SecretKey::generate(&mut rng);
        let observer = SecretKey::generate(&mut rng);
        let m = |id: NodeId, name: &str, role| Member {
            id,
            name: name.into(),
            roles: vec![role],
            labels: BTreeMap::new(),
            capacity: Capacity::default(),
        };
        let roster = Roster {
            cluster: "c".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(u64::MAX),
            members: vec![
                m(host.public(), "h", Role::Host),
                m(observer.public(), "o", Role::Observer),
            ],
            admins: None,
        };
        Fixture {
            host,
            outsider,
            observer,
            roster,
        }
    }

    fn report(node: NodeId, seq: u64, at: u64) -> LoadReport {
        LoadReport {
            node,
            seq,
            issued_at: Timestamp(at),
            roster_epoch: 1,
            cpu_permille: 420,
            mem_used_mib: 1000,
            mem_total_mib: 4000,
            power_mw: 150_000,
            power_measured: false,
            vm_count: 2,
            vm_demand_permille: 300,
            reserved_permille: 0,
            standby: false,
        }
    }

    fn check(f: &Fixture, bytes: &[u8], newest: Option<u64>) -> Result<LoadReport, Rejection> {
        let ctx = Context {
            now: Timestamp(100_000),
            roster: &f.roster,
            freshness: Freshness::default(),
        };
        validate(bytes, &ctx, |_| newest).map(|(_, r)| r)
    }

    #[test]
    fn accepts_a_good_report_and_names_every_rejection() {
        let f = fixture();
        let me = f.host.public();
        let good = report(me, 5, 99_000);
        let frame = encode_frame(&Signed::sign(&good, &f.host));
        assert_eq!(check(&f, &frame, Some(4)), Ok(good.clone()));

        assert_eq!(
            check(&f, &frame, Some(5)),
            Err(Rejection::Stale { newest: 5, got: 5 })
        );
        let by_outsider = encode_frame(&Signed::sign(
            &report(f.outsider.public(), 1, 99_000),
            &f.outsider,
        ));
        assert_eq!(
            check(&f, &by_outsider, None),
            Err(Rejection::UnknownSigner(f.outsider.public()))
        );
        let by_observer = encode_frame(&Signed::sign(
            &report(f.observer.public(), 1, 99_000),
            &f.observer,
        ));
        assert_eq!(
            check(&f, &by_observer, None),
            Err(Rejection::NotAHost(f.observer.public()))
        );
        let about_other = encode_frame(&Signed::sign(
            &report(f.observer.public(), 1, 99_000),
            &f.host,
        ));
        assert!(matches!(
            check(&f, &about_other, None),
            Err(Rejection::SignerNotSubject { .. })
        ));
        let old = encode_frame(&Signed::sign(&report(me, 6, 10_000), &f.host));
        assert_eq!(
            check(&f, &old, None),
            Err(Rejection::TooOld {
                node: me,
                age_ms: 90_000
            })
        );
        let future = encode_frame(&Signed::sign(&report(me, 6, 200_000), &f.host));
        assert_eq!(
            check(&f, &future, None),
            Err(Rejection::FromFuture {
                node: me,
                ahead_ms: 100_000
            })
        );
        let mut hot = report(me, 6, 99_000);
        hot.cpu_permille = 1001;
        let hot = encode_frame(&Signed::sign(&hot, &f.host));
        assert_eq!(
            check(&f, &hot, None),
            Err(Rejection::OutOfRange {
                field: "cpu_permille"
            })
        );
        // Forged: the outsider's signature under the host's name.
        let (bytes, _, _) = Signed::sign(&good, &f.host).into_parts();
        let (_, _, sig) = Signed::sign(&good, &f.outsider).into_parts();
        let forged = encode_frame(&Signed::<LoadReport>::from_parts(bytes, me, sig));
        assert_eq!(check(&f, &forged, None), Err(Rejection::BadSignature));
        let big = vec![0u8; MAX_REPORT_LEN + 1];
        assert!(matches!(
            check(&f, &big, None),
            Err(Rejection::Oversized { .. })
        ));
        assert!(matches!(
            check(&f, b"garbage", None),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn labels_are_listed_and_late_delivery_is_not_misbehaviour() {
        let r = Rejection::Stale { newest: 1, got: 1 };
        assert!(!r.is_misbehaviour());
        assert!(Rejection::BadSignature.is_misbehaviour());
        // While a roster change spreads, honest relays carry reports of members this node
        // does not know yet: dropped, but no penalty.
        let key = crate::keys::SecretKey::from_bytes(&[8; 32]).public();
        assert!(!Rejection::UnknownSigner(key).is_misbehaviour());
        assert!(!Rejection::NotAHost(key).is_misbehaviour());
        assert!(Rejection::OutOfRange {
            field: "cpu_permille"
        }
        .is_misbehaviour());
        for l in [r.label(), Rejection::BadSignature.label()] {
            assert!(Rejection::LABELS.contains(&l));
        }
    }
}
