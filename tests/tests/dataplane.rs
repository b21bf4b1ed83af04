//! Attacks on the data plane, each refused before a byte of the VM is read, and audited.
//!
//! X is a `drift run` process. The adversary A is a roster member running in this test process
//! (it speaks the migration protocol with offers it builds itself, and opens data connections
//! with the TLS setup drift uses); M is another roster member whose key A also holds. With an
//! offer X accepted (two data connections granted), A tries: a connection from M (not the
//! offer's source), a binding for a migration X never accepted, for one X refused, and for one
//! that ended, a binding replayed on another TLS session, a connection beyond the granted two
//! and one index twice, garbage and an oversized first record inside TLS, and bytes that are not
//! TLS at all. A second test puts a man in the middle that terminates TLS with a member's key
//! on the target's data address: the source refuses it, says so, and moves the VM on the mesh
//! stream instead, as it does when no data connection can be made at all.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use drift_node::config::Config;
use drift_node::daemon;
use drift_node::dataplane::tls;
use drift_node::identity::read_key;
use drift_node::mesh::peer_id;
use drift_node::migration::frames::{read_typed, write_typed};
use drift_node::migration::service::PROTOCOL;
use drift_protocol::dataplane::{
    DataAnswer, DataBinding, DataEndpoint, EXPORTER_LABEL, EXPORTER_LEN, MAX_ANSWER_FRAME,
};
use drift_protocol::migration::{MigrationDecision, MigrationOffer, Verdict};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey, Signed, Timestamp};
use drift_tests::{drift_ok, set_data_config, wait_until, Cluster};
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::compat::FuturesAsyncReadCompatExt;

type Stream = tokio_util::compat::Compat<libp2p::Stream>;

fn offer(source: NodeId, target: NodeId, issued_at: Timestamp, connections: u32) -> MigrationOffer {
    drift_tests::probe_offer(source, target, issued_at, 30_000, connections)
}

/// Sends an offer on a new migration stream; the stream and X's decision.
async fn send_offer(
    mesh: &drift_node::mesh::Client,
    to: &NodeId,
    signed: &Signed<MigrationOffer>,
) -> (Stream, MigrationDecision) {
    let mut control = mesh.streams();
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(peer_id(to), PROTOCOL),
    )
    .await
    .unwrap()
    .unwrap()
    .compat();
    write_typed(&mut s, signed).await.unwrap();
    let decision = read_typed::<_, Signed<MigrationDecision>>(&mut s, 64 * 1024)
        .await
        .unwrap()
        .verify_by(to)
        .unwrap();
    (s, decision)
}

/// A TLS connection to X's data port as `key`, pinning X's key, and its exporter value.
async fn tls_to(
    port: u16,
    key: &SecretKey,
    x: NodeId,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    [u8; EXPORTER_LEN],
) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(key, x).unwrap());
    let tls = connector.connect(tls::server_name(), tcp).await.unwrap();
    let exporter = tls
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .unwrap();
    (tls, exporter)
}

/// X's answer to a binding; `None` when X closed the connection instead.
async fn answer_of(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> Option<DataAnswer> {
    tokio::time::timeout(
        Duration::from_secs(10),
        read_typed::<_, DataAnswer>(tls, MAX_ANSWER_FRAME),
    )
    .await
    .ok()
    .and_then(Result::ok)
}

/// Binds a fresh connection as `key` with a binding of `(id, offer, index)`; X's answer.
async fn bind(
    port: u16,
    key: &SecretKey,
    x: NodeId,
    id: MigrationId,
    offer: Hash,
    index: u32,
) -> (
    Option<DataAnswer>,
    tokio_rustls::client::TlsStream<TcpStream>,
    Signed<DataBinding>,
) {
    let (mut tls, exporter) = tls_to(port, key, x).await;
    let binding = Signed::sign(
        &DataBinding {
            id,
            offer,
            index,
            exporter,
        },
        key,
    );
    write_typed(&mut tls, &binding).await.unwrap();
    (answer_of(&mut tls).await, tls, binding)
}

/// The reasons of X's audited refusals of data connections.
fn data_refusals(c: &Cluster, i: usize) -> Vec<String> {
    let config = c.nodes[i].node.config.to_str().unwrap();
    drift_ok(&["audit", "show", "--json", "--config", config])
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let reason = v["event"].get("Refused")?["reason"].as_str()?.to_string();
            reason.starts_with("data connection").then_some(reason)
        })
        .collect()
}

/// Waits until X audited a refusal with `label` that the earlier ones did not have.
fn audited(c: &Cluster, i: usize, label: &str, before: usize) {
    let needle = format!("refused: {label} ");
    let ok = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        let r = data_refusals(c, i);
        r[before.min(r.len())..]
            .iter()
            .any(|r| r.contains(&needle))
            .then_some(())
    });
    assert!(
        ok.is_some(),
        "no audited refusal {label:?} after the first {before}: {:?}",
        data_refusals(c, i)
    );
}

#[test]
fn bad_data_connections_are_refused_before_anything_is_read_and_audited() {
    let mut c = Cluster::generate(3, Duration::from_millis(300));
    c.nodes[0].start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let config = Config::load(&c.nodes[1].node.config).unwrap();
    let key = read_key(&config.node.key).unwrap();
    let member = read_key(&c.nodes[2].node.dir.join("node.key")).unwrap();
    let adversary = rt.block_on(daemon::start(config)).unwrap();
    c.wait_converged_subset(&[0], 2, Duration::from_secs(60))
        .unwrap();
    let x = c.nodes[0].node.id;
    let port = c.nodes[0].node.data_port;
    let mesh = adversary.mesh.clone();
    let now = drift_node::clock::now();

    // An accepted offer, two data connections granted.
    let good = offer(key.public(), x, now, 2);
    let signed = Signed::sign(&good, &key);
    let (control, decision) = rt.block_on(send_offer(&mesh, &x, &signed));
    let Verdict::Accept {
        data: Some(endpoint),
        ..
    } = decision.verdict
    else {
        panic!("no data endpoint in the decision: {decision:?}");
    };
    assert_eq!(
        endpoint,
        DataEndpoint {
            port,
            addrs: vec![format!("127.0.0.1:{port}")],
            connections: 2
        }
    );
    let (id, hash) = (good.id, signed.hash());
    let mut n = data_refusals(&c, 0).len();

    // A roster member that is not the offer's source.
    let (answer, _, _) = rt.block_on(bind(port, &member, x, id, hash, 0));
    assert_eq!(answer, Some(DataAnswer::NotTheSource));
    audited(&c, 0, "not_the_source", n);
    n = data_refusals(&c, 0).len();

    // A migration X never accepted, and the right id with another offer's hash.
    let (answer, _, _) = rt.block_on(bind(
        port,
        &key,
        x,
        MigrationId::random(&mut OsRng),
        hash,
        0,
    ));
    assert_eq!(answer, Some(DataAnswer::UnknownMigration));
    let (answer, _, _) = rt.block_on(bind(port, &key, x, id, Hash::of(b"other"), 0));
    assert_eq!(answer, Some(DataAnswer::UnknownMigration));
    audited(&c, 0, "unknown_migration", n);
    n = data_refusals(&c, 0).len();

    // The source's own connections: 0 and 1 are taken, 2 is beyond the grant, 1 again is
    // taken already.
    let (answer, _conn0, binding0) = rt.block_on(bind(port, &key, x, id, hash, 0));
    assert_eq!(answer, Some(DataAnswer::Accepted));
    let (answer, _conn1, _) = rt.block_on(bind(port, &key, x, id, hash, 1));
    assert_eq!(answer, Some(DataAnswer::Accepted));
    let (answer, _, _) = rt.block_on(bind(port, &key, x, id, hash, 2));
    assert_eq!(answer, Some(DataAnswer::BeyondAgreed));
    audited(&c, 0, "beyond_agreed", n);
    n = data_refusals(&c, 0).len();
    let (answer, _, _) = rt.block_on(bind(port, &key, x, id, hash, 1));
    assert_eq!(answer, Some(DataAnswer::AlreadyOpen));
    audited(&c, 0, "already_open", n);
    n = data_refusals(&c, 0).len();

    // A binding recorded on one TLS session, replayed on another.
    let answer = rt.block_on(async {
        let (mut tls, _) = tls_to(port, &key, x).await;
        write_typed(&mut tls, &binding0).await.unwrap();
        answer_of(&mut tls).await
    });
    assert_eq!(answer, Some(DataAnswer::BadBinding));
    audited(&c, 0, "bad_binding", n);
    n = data_refusals(&c, 0).len();

    // Garbage, and a header announcing 1 MiB, as the first record inside TLS.
    for first in [
        b"\x00\x00\x00\x20\x01garbage garbage garbage garbage".to_vec(),
        vec![0x00, 0x10, 0x00, 0x00, 0x01],
    ] {
        let answer = rt.block_on(async {
            let (mut tls, _) = tls_to(port, &key, x).await;
            tls.write_all(&first).await.unwrap();
            tls.flush().await.unwrap();
            answer_of(&mut tls).await
        });
        assert_eq!(answer, Some(DataAnswer::BadBinding), "{first:?}");
        audited(&c, 0, "bad_binding", n);
        n = data_refusals(&c, 0).len();
    }

    // Bytes that are not TLS at all.
    rt.block_on(async {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    });
    audited(&c, 0, "tls", n);
    n = data_refusals(&c, 0).len();

    // A key that is not in the roster fails the handshake.
    let stranger = SecretKey::generate(&mut OsRng);
    rt.block_on(async {
        let (mut tls, _) = tls_to(port, &stranger, x).await;
        // TLS 1.3: the client learns of the refusal when it reads.
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
        assert!(!matches!(read, Ok(Ok(n)) if n > 0), "a stranger got bytes");
    });
    audited(&c, 0, "tls", n);

    // The accepted migration ends (its stream closes before it starts); its connections are
    // refused from then on.
    drop(control);
    let ended = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let config = c.nodes[0].node.config.to_str().unwrap();
        drift_ok(&["audit", "show", "--json", "--config", config])
            .lines()
            .any(|l| l.contains("Abort") && l.contains(&id.to_string()))
            .then_some(())
    });
    assert!(ended.is_some(), "X did not end the abandoned migration");
    n = data_refusals(&c, 0).len();
    let (answer, _, _) = rt.block_on(bind(port, &key, x, id, hash, 0));
    assert_eq!(answer, Some(DataAnswer::UnknownMigration));
    audited(&c, 0, "unknown_migration", n);
    n = data_refusals(&c, 0).len();

    // An offer X refused (addressed to another node) has no connections either.
    let refused = offer(key.public(), c.nodes[2].node.id, now, 2);
    let signed_refused = Signed::sign(&refused, &key);
    let (_, decision) = rt.block_on(send_offer(&mesh, &x, &signed_refused));
    assert!(
        matches!(decision.verdict, Verdict::Reject(_)),
        "{decision:?}"
    );
    let (answer, _, _) = rt.block_on(bind(port, &key, x, refused.id, signed_refused.hash(), 0));
    assert_eq!(answer, Some(DataAnswer::UnknownMigration));
    audited(&c, 0, "unknown_migration", n);

    // X kept serving, holding nothing of any of it.
    let x_sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    let vms: serde_json::Value =
        serde_json::from_str(&drift_ok(&["vms", "--json", "--socket", &x_sock])).unwrap();
    assert_eq!(vms["vms"].as_array().unwrap().len(), 0, "{vms}");
    rt.block_on(adversary.shutdown());
}

/// A proxy that terminates TLS with `key` (a roster member's) on a loopback port; returns its
/// port and the handshakes it completed.
async fn tls_terminator(key: SecretKey) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(
        tls::server_config(&key, Arc::new(|_: &NodeId| true)).unwrap(),
    );
    let done = completed.clone();
    tokio::spawn(async move {
        // Bounded: the source tries a handful of times.
        for _ in 0..16 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            if acceptor.accept(tcp).await.is_ok() {
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (port, completed)
}

fn source_migration(c: &Cluster, vm: &str) -> serde_json::Value {
    let sock = c.nodes[0].node.socket.to_str().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&drift_ok(&["migrations", "--json", "--socket", sock])).unwrap();
    v["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["vm"] == vm)
        .cloned()
        .unwrap()
}

#[test]
fn a_man_in_the_middle_or_a_firewall_leaves_the_migration_on_the_mesh_stream() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = Cluster::generate(3, Duration::from_millis(300));
    let member = read_key(&c.nodes[2].node.dir.join("node.key")).unwrap();
    let (mitm, completed) = rt.block_on(tls_terminator(member));
    // node-2 announces the man in the middle as its data address.
    set_data_config(
        &c.nodes[1].node.config,
        &[("advertise", format!("[\"127.0.0.1:{mitm}\"]"))],
    );
    c.nodes[0].start();
    c.nodes[1].start();
    c.wait_converged_subset(&[0, 1], 2, Duration::from_secs(60))
        .unwrap();
    let socks: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.node.socket.to_str().unwrap().to_string())
        .collect();
    let sock = |i: usize| socks[i].clone();
    drift_ok(&[
        "vm",
        "create",
        "web",
        "--memory-mib",
        "16",
        "--socket",
        &sock(0),
    ]);
    let out = drift_ok(&[
        "migrate",
        "web",
        "--to",
        "node-2",
        "--watch",
        "--socket",
        &sock(0),
    ]);
    assert!(out.contains("committed"), "{out}");
    let ok = drift_ok(&["vm", "verify", "web", "--socket", &sock(1)]);
    assert!(ok.starts_with("ok:"), "{ok}");
    assert_eq!(
        completed.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the source completed a handshake with the man in the middle"
    );
    let m = source_migration(&c, "web");
    let transport = m["progress"]["transport"].as_str().unwrap();
    assert!(
        transport.starts_with("stream (no data connection: TLS with 127.0.0.1:"),
        "{transport}"
    );
    assert!(
        data_refusals(&c, 0)
            .iter()
            .any(|r| r.contains("refused: tls")),
        "the source did not audit the impostor: {:?}",
        data_refusals(&c, 0)
    );

    // A firewall: nothing answers on the announced address. The VM comes back on the stream.
    c.nodes[0].terminate(Duration::from_secs(10));
    set_data_config(
        &c.nodes[0].node.config,
        &[("advertise", "[\"127.0.0.1:9\"]".to_string())],
    );
    c.nodes[0].start();
    c.wait_converged_subset(&[0, 1], 2, Duration::from_secs(60))
        .unwrap();
    let out = drift_ok(&[
        "migrate",
        "web",
        "--to",
        "node-1",
        "--watch",
        "--socket",
        &sock(1),
    ]);
    assert!(out.contains("committed"), "{out}");
    let ok = drift_ok(&["vm", "verify", "web", "--socket", &sock(0)]);
    assert!(ok.starts_with("ok:"), "{ok}");
    let v: serde_json::Value =
        serde_json::from_str(&drift_ok(&["migrations", "--json", "--socket", &sock(1)])).unwrap();
    let back = v["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|m| m["vm"] == "web" && m["role"] == "source")
        .unwrap()
        .clone();
    let transport = back["progress"]["transport"].as_str().unwrap();
    assert!(
        transport.starts_with("stream (no data connection: cannot reach 127.0.0.1:9"),
        "{transport}"
    );
    // `drift migrations` says so too.
    let table = drift_ok(&["migrations", "--socket", &sock(1)]);
    assert!(table.contains("stream"), "{table}");
}
