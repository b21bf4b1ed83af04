//! A target's capacity cannot be held hostage. X is a `drift run` process with short
//! `[admission]` deadlines; the adversary is a roster member running in this test process that
//! gets offers accepted and then stalls or sends frames that do not decode; H is an honest
//! `drift run` process that migrates a VM to X meanwhile.
//!
//! After every case X holds no slot, no reservation, no stream and no incoming VM, its audit
//! log names what the adversary did, and a source that stalls repeatedly is backed off until
//! its back-off ends.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::{Duration, Instant};

use drift_node::config::Config;
use drift_node::daemon;
use drift_node::identity::read_key;
use drift_node::migration::frames::{read_frame, write_frame, write_typed};
use drift_node::migration::service::PROTOCOL;
use drift_protocol::migration::{MigrationDecision, Verdict};
use drift_protocol::transfer::{AbortReason, PageBatch, Start, TransferFrame, PAGE_SIZE};
use drift_protocol::{MigrationOffer, NodeId, SecretKey, Signed};
use drift_tests::Stream;
use drift_tests::{append_config, audited, drift, drift_ok, send_offer, wait_until, Cluster};

const ADMISSION: &str = "[admission]\n\
    start_timeout = \"2s\"\n\
    frame_gap = \"3s\"\n\
    progress_window = \"1s\"\n\
    min_rate_kib_per_s = 1024\n\
    backoff_after = 2\n\
    backoff = \"3s\"\n\
    backoff_max = \"3s\"\n";

struct Adversary {
    rt: tokio::runtime::Runtime,
    mesh: drift_node::mesh::Client,
    key: SecretKey,
    x: NodeId,
}

impl Adversary {
    fn offer(&self) -> (MigrationOffer, Signed<MigrationOffer>) {
        let o = drift_tests::probe_offer(
            self.key.public(),
            self.x,
            drift_node::clock::now(),
            30_000,
            0,
        );
        let signed = Signed::sign(&o, &self.key);
        (o, signed)
    }

    /// Sends a fresh offer: the stream, and the refusal's label if X refused it.
    fn propose(&self) -> (MigrationOffer, Stream, Result<(), String>) {
        let (o, signed) = self.offer();
        let (s, d) = self.rt.block_on(send_offer(&self.mesh, &self.x, &signed));
        let verdict = match d.map(|d| d.verdict) {
            Some(Verdict::Accept { .. }) => Ok(()),
            Some(Verdict::Reject(r)) => Err(r.label().to_string()),
            None => Err("no answer".into()),
        };
        (o, s, verdict)
    }

    /// An accepted offer with its `Start` sent: frames on the migration stream follow. A
    /// back-off X holds against this source is waited out first.
    fn started(&self, c: &Cluster) -> (MigrationOffer, Stream) {
        let (mut o, mut s, mut verdict) = self.propose();
        if verdict.as_ref().is_err_and(|r| r == "backed_off") {
            self.wait_until_welcome(c);
            (o, s, verdict) = self.propose();
        }
        assert_eq!(verdict, Ok(()), "X refused the adversary's offer");
        let start = TransferFrame::Start(Start {
            id: o.id,
            offer: Signed::sign(&o, &self.key).hash(),
            mode: o.mode,
            page_size: PAGE_SIZE as u32,
            page_count: o.vm.memory_mib * 256,
            data_connections: 0,
        });
        self.rt.block_on(write_frame(&mut s, &start)).unwrap();
        (o, s)
    }

    /// The `Abort` X sends before it closes the stream.
    fn abort_reason(&self, s: &mut Stream) -> Option<AbortReason> {
        self.rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(15), read_frame(s)).await {
                    Ok(Ok(Some(TransferFrame::Abort(a)))) => return Some(a.reason),
                    Ok(Ok(Some(_))) => continue,
                    _ => return None,
                }
            }
        })
    }

    /// Waits out a back-off X holds against this source.
    fn wait_until_welcome(&self, c: &Cluster) {
        let ok = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            c.status(0)?.admission.backed_off.is_empty().then_some(())
        });
        assert!(ok.is_some(), "the back-off never ended");
    }
}

/// X holds nothing for any incoming migration: no slot, reservation, stream or VM.
fn assert_x_holds_nothing(c: &Cluster, what: &str) {
    let sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    let ok = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let s = c.status(0)?;
        let v: serde_json::Value =
            serde_json::from_str(&drift_ok(&["vms", "--json", "--socket", &sock])).ok()?;
        let no_vm = v["vms"].as_array()?.iter().all(|vm| vm["name"] != "probe");
        (s.admission.slots_in_use == 0
            && s.admission.reserved_mib == 0
            && s.incoming_streams == 0
            && no_vm)
            .then_some(())
    });
    assert!(ok.is_some(), "{what}: X still holds {:?}", c.status(0));
}

fn wait_audited(c: &Cluster, event: &str, what: &str, found: impl Fn(&str) -> bool) -> String {
    let hit = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        audited(&c.nodes[0].node.config, event)
            .into_iter()
            .find(|r| found(r))
    });
    hit.unwrap_or_else(|| {
        panic!(
            "X did not audit {what}: {:?}",
            audited(&c.nodes[0].node.config, event)
        )
    })
}

#[test]
fn stalled_and_broken_migrations_free_the_target_and_back_their_source_off() {
    let mut c = Cluster::generate(3, Duration::from_millis(300));
    append_config(&c.nodes[0].node.config, ADMISSION);
    c.nodes[0].start();
    c.nodes[2].start();
    let config = Config::load(&c.nodes[1].node.config).unwrap();
    let key = read_key(&config.node.key).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = rt.block_on(daemon::start(config)).unwrap();
    c.wait_converged_subset(&[0, 2], 3, Duration::from_secs(60))
        .unwrap();
    let adv = Adversary {
        mesh: node.mesh.clone(),
        rt,
        key,
        x: c.nodes[0].node.id,
    };
    let h_sock = c.nodes[2].node.socket.to_str().unwrap().to_string();
    drift_ok(&[
        "vm",
        "create",
        "web",
        "--memory-mib",
        "16",
        "--socket",
        &h_sock,
    ]);

    // 1. Two silent streams: the first offer is accepted, the second is over this source's
    // share. An honest migration gets the slot left, at once.
    let (_, _quiet, first) = adv.propose();
    assert_eq!(first, Ok(()));
    let (_, _quiet2, second) = adv.propose();
    assert_eq!(second, Err("source_share".to_string()));
    let x_status = c.status(0).unwrap();
    assert_eq!(x_status.admission.slots_in_use, 1, "{x_status:?}");
    let out = drift(&[
        "migrate", "web", "--to", "node-1", "--watch", "--socket", &h_sock,
    ]);
    assert!(
        out.status.success(),
        "the honest migration did not get through: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reason = wait_audited(&c, "Abort", "the silent stream", |r| {
        r.starts_with("stalled: no Start")
    });
    assert!(reason.contains("2.0 s"), "{reason}");
    assert_x_holds_nothing(&c, "after the silent stream");

    // 2. A trickle of empty batches after Start: aborted within the progress window.
    let (_, mut s) = adv.started(&c);
    let began = Instant::now();
    let trickle = adv.rt.spawn({
        let empty = TransferFrame::Pages(PageBatch::build(0, std::iter::empty::<(u64, &[u8])>()));
        async move {
            for _ in 0..25 {
                if write_frame(&mut s, &empty).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            s
        }
    });
    let reason = wait_audited(&c, "Abort", "the trickle", |r| {
        r.starts_with("stalled: 0 bytes of memory in 1.0 s")
    });
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "the trickle lasted {:?}",
        began.elapsed()
    );
    assert!(reason.contains("0 pages"), "{reason}");

    // Two stalls: the source is backed off, audited, shown in the status, then welcome again.
    wait_audited(&c, "Refused", "the back-off", |r| {
        r.starts_with("source backed off for 3 s")
    });
    let (_, _, verdict) = adv.propose();
    assert_eq!(verdict, Err("backed_off".to_string()));
    let backed = c.status(0).unwrap().admission.backed_off;
    assert_eq!(backed.len(), 1);
    assert_eq!(backed[0].source, adv.key.public());
    let text = drift_ok(&[
        "status",
        "--socket",
        c.nodes[0].node.socket.to_str().unwrap(),
    ]);
    assert!(text.contains("backed off"), "{text}");
    let mut s = adv.rt.block_on(trickle).unwrap();
    assert_eq!(adv.abort_reason(&mut s), Some(AbortReason::Stalled));
    assert_x_holds_nothing(&c, "after the trickle");
    adv.wait_until_welcome(&c);

    // 3. Ten stacked streams, the accepted ones trickling: X never holds more than its limits
    // and keeps serving.
    let stalls = |c: &Cluster| {
        audited(&c.nodes[0].node.config, "Abort")
            .iter()
            .filter(|r| r.starts_with("stalled"))
            .count()
    };
    let stalls_before = stalls(&c);
    let streams: Vec<_> = (0..10)
        .map(|_| {
            let (o, signed) = adv.offer();
            let mesh = adv.mesh.clone();
            let x = adv.x;
            // X may drop streams past its limit unread: nothing here may fail on that.
            adv.rt.spawn(async move {
                use drift_node::migration::frames::read_typed;
                let mut control = mesh.streams();
                let opened = tokio::time::timeout(
                    Duration::from_secs(10),
                    control.open_stream(drift_node::mesh::peer_id(&x), PROTOCOL),
                )
                .await;
                let Ok(Ok(s)) = opened else {
                    return (o, None, None);
                };
                let mut s = tokio_util::compat::FuturesAsyncReadCompatExt::compat(s);
                if write_typed(&mut s, &signed).await.is_err() {
                    return (o, Some(s), None);
                }
                let d = tokio::time::timeout(
                    Duration::from_secs(10),
                    read_typed::<_, Signed<MigrationDecision>>(&mut s, 64 * 1024),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|d| d.verify_by(&x).ok());
                // An accepted one trickles: Start, then an empty batch every 200 ms, for at
                // most 5 s.
                if matches!(d.as_ref().map(|d| &d.verdict), Some(Verdict::Accept { .. })) {
                    let start = TransferFrame::Start(Start {
                        id: o.id,
                        offer: signed.hash(),
                        mode: o.mode,
                        page_size: PAGE_SIZE as u32,
                        page_count: o.vm.memory_mib * 256,
                        data_connections: 0,
                    });
                    let empty = TransferFrame::Pages(PageBatch::build(
                        0,
                        std::iter::empty::<(u64, &[u8])>(),
                    ));
                    let mut sent = write_frame(&mut s, &start).await.is_ok();
                    for _ in 0..25 {
                        if !sent {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        sent = write_frame(&mut s, &empty).await.is_ok();
                    }
                }
                (o, Some(s), d)
            })
        })
        .collect();
    let mut peak = 0;
    for _ in 0..20 {
        let s = c.status(0).expect("X keeps serving its API");
        assert!(
            s.admission.slots_in_use <= s.admission.max_incoming,
            "{s:?}"
        );
        assert!(s.incoming_streams <= 8, "{s:?}");
        peak = peak.max(s.admission.slots_in_use);
        std::thread::sleep(Duration::from_millis(50));
    }
    let answered: Vec<_> = streams
        .into_iter()
        .map(|t| adv.rt.block_on(t).unwrap())
        .collect();
    let accepted = answered
        .iter()
        .filter(|(_, _, d)| matches!(d.as_ref().map(|d| &d.verdict), Some(Verdict::Accept { .. })))
        .count();
    assert!(accepted <= 1, "one source got {accepted} slots");
    assert!(peak <= 1, "one source held {peak} slots");
    assert_eq!(accepted, 1, "X took none of ten offers with a slot free");
    let stalled = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (stalls(&c) > stalls_before).then_some(())
    });
    assert!(stalled.is_some(), "the accepted trickle was not stalled");
    drop(answered);
    assert_x_holds_nothing(&c, "after the stacked streams");

    // 4. Every kind of frame that does not decode, during a transfer: each audited for what it
    // was, and answered with an Abort.
    let mut too_large = (drift_protocol::MAX_FRAME_LEN as u32 + 1)
        .to_be_bytes()
        .to_vec();
    too_large.push(drift_protocol::PROTOCOL_VERSION);
    let mut bad_version = 2u32.to_be_bytes().to_vec();
    bad_version.extend([0xee, 0]);
    let mut undecodable = 3u32.to_be_bytes().to_vec();
    undecodable.extend([drift_protocol::PROTOCOL_VERSION, 0xff, 0xff]);
    let cases: [(&str, Vec<u8>, AbortReason); 4] = [
        ("empty", vec![0, 0, 0, 0], AbortReason::Malformed),
        ("too_large", too_large, AbortReason::Malformed),
        ("bad_version", bad_version, AbortReason::Malformed),
        ("undecodable", undecodable, AbortReason::Malformed),
    ];
    for (label, bytes, code) in cases {
        let (_, mut s) = adv.started(&c);
        adv.rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            s.write_all(&bytes).await.unwrap();
            s.flush().await.unwrap();
        });
        assert_eq!(adv.abort_reason(&mut s), Some(code), "{label}");
        wait_audited(&c, "Abort", label, |r| r.starts_with(&format!("{label}:")));
        drop(s);
        assert_x_holds_nothing(&c, label);
    }
    // A batch whose hash does not match its pages.
    let (_, mut s) = adv.started(&c);
    let page = vec![9u8; PAGE_SIZE];
    let mut batch = PageBatch::build(0, [(1, &page[..])]);
    batch.data[7] ^= 1;
    adv.rt
        .block_on(write_frame(&mut s, &TransferFrame::Pages(batch)))
        .unwrap();
    assert_eq!(adv.abort_reason(&mut s), Some(AbortReason::BadBatch));
    wait_audited(&c, "Abort", "the bad batch", |r| {
        r.starts_with("bad_batch:")
    });
    assert_x_holds_nothing(&c, "after the bad batch");

    // The honest VM runs on X, and X's log verifies.
    let x_sock = c.nodes[0].node.socket.to_str().unwrap().to_string();
    assert!(drift_ok(&["vm", "verify", "web", "--socket", &x_sock]).starts_with("ok:"));
    let config = c.nodes[0].node.config.to_str().unwrap();
    assert!(drift_ok(&["audit", "verify", "--config", config]).starts_with("ok:"));
}
