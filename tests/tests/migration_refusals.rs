//! Migration requests that must be refused, each audited by the target: an offer signed by a
//! non-member, an expired offer, a replayed offer, a stream that does not start with an offer,
//! a transfer that does not match the accepted offer, a resolve query from a node that is not
//! the migration's source, and a non-member's connection.
//!
//! X is a `drift run` process; the adversary is a roster member running in this test process,
//! speaking `/drift/migrate/2` with frames it builds itself. X must refuse each request, keep
//! nothing of it (no incoming VM, no reservation), audit it, and keep serving.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use drift_node::config::Config;
use drift_node::daemon;
use drift_node::identity::read_key;
use drift_node::mesh::peer_id;
use drift_node::migration::frames::{write_frame, write_typed};
use drift_node::migration::service::{PROTOCOL, RESOLVE_PROTOCOL};
use drift_protocol::migration::{MigrationOffer, Mode, ResolveQuery, Verdict};
use drift_protocol::transfer::{Start, TransferFrame, PAGE_SIZE};
use drift_protocol::{Hash, NodeId, SecretKey, Signed, Timestamp};
use drift_tests::{drift_ok, open, send_offer, wait_until, Cluster};
use rand_core::OsRng;

fn offer(source: NodeId, target: NodeId, issued_at: Timestamp, ttl_ms: u64) -> MigrationOffer {
    drift_tests::probe_offer(source, target, issued_at, ttl_ms, 0)
}

fn refusals(c: &Cluster) -> Vec<String> {
    drift_tests::audited(&c.nodes[0].node.config, "Refused")
}

fn aborts(c: &Cluster) -> Vec<String> {
    drift_tests::audited(&c.nodes[0].node.config, "Abort")
}

fn wait_for(
    c: &Cluster,
    what: &str,
    found: impl Fn(&[String]) -> bool,
    of: fn(&Cluster) -> Vec<String>,
) {
    let ok = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        found(&of(c)).then_some(())
    });
    assert!(ok.is_some(), "X did not audit {what}: {:?}", of(c));
}

#[test]
fn bad_migration_requests_are_refused_and_audited() {
    let mut c = Cluster::generate(2, Duration::from_millis(300));
    c.nodes[0].start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = Config::load(&c.nodes[1].node.config).unwrap();
    let key = read_key(&config.node.key).unwrap();
    let adversary = rt.block_on(daemon::start(config)).unwrap();
    c.wait_converged_subset(&[0], 2, Duration::from_secs(60))
        .unwrap();
    let x = c.nodes[0].node.id;
    let me = key.public();
    let mesh = adversary.mesh.clone();
    let now = drift_node::clock::now();
    let x_sock = c.nodes[0].node.socket.to_str().unwrap().to_string();

    // 1. An offer signed by a key that is not in the roster, relayed by a member.
    let outsider = SecretKey::generate(&mut OsRng);
    let forged = Signed::sign(&offer(outsider.public(), x, now, 30_000), &outsider);
    let (_, d) = rt.block_on(send_offer(&mesh, &x, &forged));
    assert!(
        matches!(d.as_ref().map(|d| &d.verdict), Some(Verdict::Reject(r)) if r.label() == "wrong_signer"),
        "a non-member's offer was not refused as such: {d:?}"
    );
    wait_for(
        &c,
        "the non-member's offer",
        |r| r.iter().any(|r| r.contains("wrong_signer")),
        refusals,
    );

    // 2. An expired offer.
    let old = Timestamp(now.as_millis() - 120_000);
    let expired = Signed::sign(&offer(me, x, old, 30_000), &key);
    let (_, d) = rt.block_on(send_offer(&mesh, &x, &expired));
    assert!(
        matches!(d.map(|d| d.verdict), Some(Verdict::Reject(r)) if r.label() == "expired"),
        "expired offer not refused as such"
    );
    wait_for(
        &c,
        "the expired offer",
        |r| r.iter().any(|r| r.contains("expired")),
        refusals,
    );

    // 3. A valid offer is accepted; the adversary then sends a transfer that does not match it
    //    (the hash of another offer). X aborts and discards the incoming VM.
    let good = offer(me, x, now, 30_000);
    let signed_good = Signed::sign(&good, &key);
    let (mut s, d) = rt.block_on(send_offer(&mesh, &x, &signed_good));
    assert!(
        matches!(d.map(|d| d.verdict), Some(Verdict::Accept { .. })),
        "the valid offer was not accepted"
    );
    let wrong = TransferFrame::Start(Start {
        id: good.id,
        offer: Hash::of(b"some other offer"),
        mode: Mode::PreCopy,
        page_size: PAGE_SIZE as u32,
        page_count: 256,
        data_connections: 0,
    });
    rt.block_on(write_frame(&mut s, &wrong)).unwrap();
    wait_for(
        &c,
        "the mismatched transfer",
        |a| {
            a.iter()
                .any(|a| a.contains("start does not match the accepted offer"))
        },
        aborts,
    );
    drop(s);
    let gone = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let v: serde_json::Value =
            serde_json::from_str(&drift_ok(&["vms", "--json", "--socket", &x_sock])).ok()?;
        v["vms"].as_array()?.is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "X kept the incoming VM of a refused transfer"
    );

    // 4. The same signed offer again: a replay.
    let (_, d) = rt.block_on(send_offer(&mesh, &x, &signed_good));
    assert!(
        matches!(d.map(|d| d.verdict), Some(Verdict::Reject(r)) if r.label() == "replayed"),
        "replayed offer not refused as such"
    );
    wait_for(
        &c,
        "the replayed offer",
        |r| r.iter().any(|r| r.contains("replayed")),
        refusals,
    );

    // 5. A migration stream that starts with transfer frames instead of an offer.
    let mut s = rt.block_on(open(&mesh, &x, PROTOCOL));
    rt.block_on(write_frame(&mut s, &wrong)).unwrap();
    drop(s);
    wait_for(
        &c,
        "a stream without an offer",
        |r| {
            r.iter()
                .any(|r| r.contains("did not start with a valid offer"))
        },
        refusals,
    );

    // 6. A resolve query naming another node as the source.
    let query = Signed::sign(
        &ResolveQuery {
            id: good.id,
            source: outsider.public(),
            target: x,
            asked_at: now,
        },
        &key,
    );
    let mut s = rt.block_on(open(&mesh, &x, RESOLVE_PROTOCOL));
    rt.block_on(write_typed(&mut s, &query)).unwrap();
    drop(s);
    wait_for(
        &c,
        "the resolve query",
        |r| r.iter().any(|r| r.contains("resolve query refused")),
        refusals,
    );

    // 7. A non-member cannot even connect; the refusal is audited too.
    let dir = c.path().join("outsider");
    let outsider_config = drift_tests::outsider_config(&c.nodes[1].node.config, &dir, &outsider);
    let intruder = rt
        .block_on(daemon::start(Config::load(&outsider_config).unwrap()))
        .unwrap();
    let opened = rt.block_on(async {
        let mut control = intruder.mesh.streams();
        tokio::time::timeout(
            Duration::from_secs(5),
            control.open_stream(peer_id(&x), PROTOCOL),
        )
        .await
    });
    assert!(
        !matches!(opened, Ok(Ok(_))),
        "a non-member opened a migration stream"
    );
    wait_for(
        &c,
        "the non-member's connection",
        |r| r.iter().any(|r| r.starts_with("connection from")),
        refusals,
    );

    // X keeps serving, holds no VM, and its audit log verifies.
    let v: serde_json::Value =
        serde_json::from_str(&drift_ok(&["vms", "--json", "--socket", &x_sock])).unwrap();
    assert!(v["vms"].as_array().unwrap().is_empty(), "{v}");
    assert!(c.status(0).is_some());
    let config = c.nodes[0].node.config.to_str().unwrap().to_string();
    drift_ok(&["audit", "verify", "--config", &config]);
    println!("X refused and audited: {:#?}", refusals(&c));
    rt.block_on(intruder.shutdown());
    rt.block_on(adversary.shutdown());
}
