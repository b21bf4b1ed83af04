//! QMP client tests against a scripted QMP server on a Unix socket.

#![allow(clippy::unwrap_used)]

use super::*;
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
const SHORT: Duration = Duration::from_secs(5);

/// A fake QEMU serving one connection; `greeting: None` keeps silent.
fn fake(greeting: Option<&'static str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(stream, greeting).await;
    });
    (dir, path)
}

async fn send(write: &mut OwnedWriteHalf, line: &str) {
    write
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .unwrap();
}

async fn serve(stream: UnixStream, greeting: Option<&str>) {
    let (read, mut write) = stream.into_split();
    let Some(greeting) = greeting else {
        return std::future::pending().await;
    };
    send(&mut write, greeting).await;
    let mut lines = BufReader::new(read).lines();
    let (mut negotiated, mut held) = (false, Vec::new());
    let (mut migrate, mut last_args) = (json!({}), Value::Null);
    while let Ok(Some(line)) = lines.next_line().await {
        let cmd: Value = serde_json::from_str(&line).unwrap();
        let id = cmd["id"].clone();
        let args = cmd.get("arguments").cloned().unwrap_or(Value::Null);
        let name = cmd["execute"].as_str().unwrap().to_string();
        let ok = |v: Value| json!({ "return": v, "id": id }).to_string();
        let refuse = |class: &str, desc: String| {
            json!({ "error": { "class": class, "desc": desc }, "id": id }).to_string()
        };
        let reply = match (negotiated, name.as_str()) {
            (false, "qmp_capabilities") => {
                negotiated = true;
                ok(json!({}))
            }
            (false, _) => refuse(
                "CommandNotFound",
                "Expecting capabilities negotiation".into(),
            ),
            (true, "query-status") => {
                ok(json!({ "running": true, "singlestep": false, "status": "running" }))
            }
            (true, "query-migrate") => ok(migrate.clone()),
            (true, "x-set-migrate") => {
                migrate = args;
                ok(json!({}))
            }
            (true, "migrate-set-capabilities") => {
                last_args = args;
                ok(json!({}))
            }
            (true, "x-last-args") => ok(last_args.clone()),
            (true, "emit") => {
                for ev in args.as_array().unwrap() {
                    let mut ev = ev.clone();
                    ev["timestamp"] = json!({ "seconds": 1, "microseconds": 5 });
                    send(&mut write, &ev.to_string()).await;
                }
                ok(json!({}))
            }
            (true, "garbage") => {
                send(&mut write, "{\"return\": not json").await;
                send(&mut write, "").await;
                ok(json!("after garbage"))
            }
            (true, "huge") => {
                let _ = write.write_all(&vec![b'x'; 2 * MAX_LINE]).await;
                return std::future::pending().await;
            }
            (true, "close") => return,
            (true, "hang") => continue,
            // Answers the third held command first, then the second, then the first.
            (true, "hold") => {
                held.push(ok(args));
                if held.len() == 3 {
                    for reply in held.drain(..).rev() {
                        send(&mut write, &reply).await;
                    }
                }
                continue;
            }
            _ => refuse(
                "CommandNotFound",
                format!("The command {name} has not been found"),
            ),
        };
        send(&mut write, &reply).await;
    }
}

async fn connected() -> (tempfile::TempDir, Arc<Qmp>) {
    let (dir, path) = fake(Some(GREETING));
    (dir, Arc::new(Qmp::connect(&path, SHORT).await.unwrap()))
}

#[tokio::test]
async fn negotiates_capabilities_and_checks_the_greeting() {
    // The fake refuses every command before `qmp_capabilities`.
    let (_dir, qmp) = connected().await;
    assert!(!qmp.is_closed());
    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.running, status.status.as_str()), (true, "running"));

    let (_dir, path) = fake(Some(r#"{"hello": 1}"#));
    let err = Qmp::connect(&path, SHORT).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");

    let (_dir, path) = fake(None);
    let err = Qmp::connect(&path, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn out_of_order_answers_reach_their_callers() {
    let (_dir, qmp) = connected().await;
    let calls = (0..3).map(|n| {
        let qmp = qmp.clone();
        tokio::spawn(async move { qmp.execute("hold", Some(json!(n)), SHORT).await })
    });
    for (n, call) in calls.collect::<Vec<_>>().into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), json!(n));
    }
}

#[tokio::test]
async fn error_answers_name_class_and_desc() {
    let (_dir, qmp) = connected().await;
    let err = qmp.execute("nope", None, SHORT).await.unwrap_err();
    let QmpError::Command { class, desc } = &err else {
        panic!("{err}")
    };
    assert_eq!(class, "CommandNotFound");
    assert_eq!(desc, "The command nope has not been found");
    assert!(err
        .to_string()
        .contains("CommandNotFound: The command nope"));
}

#[tokio::test]
async fn events_reach_subscribers_and_wait_event_filters() {
    let (_dir, qmp) = connected().await;
    let mut rx = qmp.events();
    let mut all = qmp.events();
    let events = json!([
        { "event": "STOP" },
        { "event": "MIGRATION", "data": { "status": "setup" } },
        { "event": "MIGRATION", "data": { "status": "completed" } },
    ]);
    qmp.execute("emit", Some(events), SHORT).await.unwrap();

    let first = all.recv().await.unwrap();
    assert_eq!(
        (first.name.as_str(), first.timestamp_us),
        ("STOP", 1_000_005)
    );
    assert_eq!(first.data, Value::Null);
    let done = |e: &QmpEvent| e.data["status"] == "completed";
    let event = qmp
        .wait_event(&mut rx, "MIGRATION", done, SHORT)
        .await
        .unwrap();
    assert_eq!(event.data, json!({ "status": "completed" }));

    let short = Duration::from_millis(50);
    let err = qmp
        .wait_event(&mut rx, "STOP", |_| true, short)
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { what } if what == "event STOP"));
}

#[tokio::test]
async fn unanswered_command_times_out_and_the_next_works() {
    let (_dir, qmp) = connected().await;
    let err = qmp
        .execute("hang", None, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, QmpError::Timeout { what } if what == "hang"));
    assert!(qmp.shared.state().pending.is_empty());
    assert!(qmp.query_status().await.unwrap().running);
}

#[tokio::test]
async fn too_many_commands_in_flight_are_refused() {
    let (_dir, qmp) = connected().await;
    for _ in 0..MAX_IN_FLIGHT {
        let qmp = qmp.clone();
        tokio::spawn(async move { qmp.execute("hang", None, SHORT).await });
    }
    let deadline = tokio::time::Instant::now() + SHORT;
    while qmp.shared.state().pending.len() < MAX_IN_FLIGHT {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let err = qmp.query_status().await.unwrap_err();
    assert!(matches!(err, QmpError::Busy), "{err}");
}

#[tokio::test]
async fn closed_socket_fails_pending_and_later_calls() {
    let (_dir, qmp) = connected().await;
    let mut rx = qmp.events();
    let hung = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("hang", None, SHORT).await }
    });
    let err = qmp.execute("close", None, SHORT).await.unwrap_err();
    assert!(matches!(err, QmpError::Closed), "{err}");
    assert!(matches!(hung.await.unwrap(), Err(QmpError::Closed)));
    assert!(qmp.is_closed());
    assert!(matches!(qmp.query_status().await, Err(QmpError::Closed)));
    let stop = qmp.wait_event(&mut rx, "STOP", |_| true, SHORT).await;
    assert!(matches!(stop, Err(QmpError::Closed)));
    assert!(matches!(qmp.events().recv().await, Err(RecvError::Closed)));
}

#[tokio::test]
async fn oversized_line_is_refused() {
    let (_dir, qmp) = connected().await;
    let err = qmp.execute("huge", None, SHORT).await.unwrap_err();
    assert!(matches!(err, QmpError::Closed), "{err}");
    assert!(matches!(qmp.query_status().await, Err(QmpError::Closed)));

    // An endless line: refused without holding more than MAX_LINE bytes.
    let mut endless = BufReader::new(tokio::io::repeat(b'x'));
    let mut line = Vec::new();
    let err = read_line(&mut endless, &mut line).await.unwrap_err();
    assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    assert!(line.capacity() <= MAX_LINE);

    // The longest line allowed passes.
    let mut longest = vec![b'x'; MAX_LINE - 1];
    longest.push(b'\n');
    assert!(read_line(&mut longest.as_slice(), &mut line).await.unwrap());
    assert_eq!(line.len(), MAX_LINE);
}

#[tokio::test]
async fn malformed_lines_are_skipped() {
    let (_dir, qmp) = connected().await;
    let answer = qmp.execute("garbage", None, SHORT).await.unwrap();
    assert_eq!(answer, json!("after garbage"));
    assert!(parse_message(b"[1, 2]").is_err());
    assert!(parse_message(br#"{"return": {}}"#).is_err());
    assert!(matches!(parse_message(b" \r\n"), Ok(Message::Ignored)));
}

#[tokio::test]
async fn typed_wrappers() {
    let (_dir, qmp) = connected().await;
    qmp.set_capabilities(&[("postcopy-ram", true), ("auto-converge", false)])
        .await
        .unwrap();
    let sent = qmp.execute("x-last-args", None, SHORT).await.unwrap();
    let expected = json!({ "capabilities": [
        { "capability": "postcopy-ram", "state": true },
        { "capability": "auto-converge", "state": false },
    ]});
    assert_eq!(sent, expected);

    let completed = json!({ "status": "completed", "total-time": 1234, "downtime": 12,
        "setup-time": 3, "ram": { "transferred": 1000, "remaining": 0, "total": 268435456,
        "mbps": 830.5, "dirty-sync-count": 3, "dirty-pages-rate": 0,
        "postcopy-requests": 0, "multifd-bytes": 0 } });
    qmp.execute("x-set-migrate", Some(completed), SHORT)
        .await
        .unwrap();
    let info = qmp.query_migrate().await.unwrap();
    let expected = MigrationInfo {
        status: Some("completed".into()),
        total_time_ms: Some(1234),
        downtime_ms: Some(12),
        setup_time_ms: Some(3),
        ram_transferred: 1000,
        ram_total: 268_435_456,
        ram_mbps: 830.5,
        dirty_sync_count: 3,
        ..MigrationInfo::default()
    };
    assert_eq!(info, expected);

    let failed = json!({ "status": "failed", "error-desc": "Unable to write to socket" });
    qmp.execute("x-set-migrate", Some(failed), SHORT)
        .await
        .unwrap();
    let info = qmp.query_migrate().await.unwrap();
    let expected = MigrationInfo {
        status: Some("failed".into()),
        error_desc: Some("Unable to write to socket".into()),
        ..MigrationInfo::default()
    };
    assert_eq!(info, expected);
}

#[tokio::test]
async fn real_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let spawned = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("qemu-system-x86_64 is required in CI");
            }
            println!("SKIPPED: qemu-system-x86_64 not installed");
            return;
        }
        other => other.unwrap(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let qmp = loop {
        match Qmp::connect(&sock, SHORT).await {
            Ok(qmp) => break qmp,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("QEMU: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let mut events = qmp.events();
    qmp.stop().await.unwrap();
    qmp.wait_event(&mut events, "STOP", |_| true, SHORT)
        .await
        .unwrap();
    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.running, status.status.as_str()), (false, "paused"));
    qmp.cont().await.unwrap();
    qmp.wait_event(&mut events, "RESUME", |_| true, SHORT)
        .await
        .unwrap();
    assert!(qmp.query_status().await.unwrap().running);
    assert_eq!(qmp.query_migrate().await.unwrap().status, None);

    qmp.quit().await.unwrap();
    qmp.wait_event(&mut events, "SHUTDOWN", |_| true, SHORT)
        .await
        .unwrap();
    let exit = tokio::time::timeout(SHORT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit}");
}
