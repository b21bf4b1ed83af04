//! Tests of the version gate, the command line, the spec checks, the heartbeat reader and the
//! state mapping of QEMU VMs.

#![allow(clippy::unwrap_used)]
use super::*;
use drift_protocol::migration::Placement;
use drift_protocol::VmId;

#[tokio::test]
async fn versions_parse_from_the_banner_and_gate_multifd() {
    let old = QemuVersion::parse(
        "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
    )
    .unwrap();
    assert_eq!((old.major, old.minor, old.micro), (7, 2, 22));
    let new = QemuVersion::parse("QEMU emulator version 10.0.2 (Debian)").unwrap();
    assert_eq!(new.to_string(), "10.0.2");
    assert!(old < MULTIFD_MIN_VERSION && new >= MULTIFD_MIN_VERSION);
    assert_eq!(
        QemuVersion::parse("QEMU emulator version 9.1").map(|v| v.to_string()),
        Some("9.1.0".into())
    );
    assert_eq!(QemuVersion::parse("no version here"), None);
    assert_eq!(QemuVersion::parse("version x.1"), None);
    let vms = QemuVms::new(Accel::Tcg);
    vms.version.set(Some(old)).unwrap();
    assert!(
        vms.check_multifd(0).await.is_ok(),
        "one stream works on any QEMU"
    );
    let e = vms.check_multifd(4).await.unwrap_err();
    assert!(e.contains("7.2.22") && e.contains("10.0.0"), "{e}");
}

fn spec(incoming: bool) -> (VmSpec, QemuSpec) {
    let q = QemuSpec {
        kernel: "/images/vmlinuz".into(),
        initrd: Some("/images/initrd.img".into()),
        append: "console=ttyS0 quiet".into(),
        disk: None,
        extra_args: vec!["-rtc".into(), "base=utc".into()],
        multifd_channels: 4,
    };
    let s = VmSpec {
        id: VmId::from_bytes([1; 16]),
        name: "web-1".into(),
        memory_mib: 256,
        vcpus: 2,
        demand_permille: 0,
        dirty_pages_per_s: 0,
        page_random_pct: None,
        placement: Placement::default(),
        seed: 1,
        incoming,
        qemu: Some(q.clone()),
    };
    (s, q)
}

#[test]
fn command_lines_carry_the_spec_and_incoming_waits_paused() {
    let (s, q) = spec(false);
    let args = command_line(&s, &q, Path::new("/var/lib/drift/vms/x"), Accel::Tcg);
    let joined = args.join(" ");
    for want in [
        "-accel tcg",
        "-cpu qemu64",
        "-m 256M",
        "-smp 2",
        "-kernel /images/vmlinuz",
        "-initrd /images/initrd.img",
        "-append console=ttyS0 quiet",
        "-serial file:/var/lib/drift/vms/x/serial.log",
        "-qmp unix:/var/lib/drift/vms/x/qmp.sock,server=on,wait=off",
        "-daemonize",
        "-rtc base=utc",
    ] {
        assert!(joined.contains(want), "{want:?} missing from {joined}");
    }
    assert!(!joined.contains("-incoming"));
    let (s, q) = spec(true);
    let joined = command_line(&s, &q, Path::new("/d"), Accel::Kvm).join(" ");
    assert!(joined.contains("-incoming defer -S"), "{joined}");
    assert!(joined.contains("-accel kvm"), "{joined}");
}

#[test]
fn specs_with_relative_paths_or_too_many_channels_are_refused() {
    let (_, mut q) = spec(false);
    q.validate().unwrap();
    q.kernel = "vmlinuz".into();
    let e = q.validate().unwrap_err().to_string();
    assert!(e.contains("qemu.kernel"), "{e}");
    let (_, mut q) = spec(false);
    q.multifd_channels = 99;
    let e = q.validate().unwrap_err().to_string();
    assert!(e.contains("multifd_channels"), "{e}");
}

#[test]
fn incoming_specs_must_name_shared_images_and_carry_no_arguments() {
    let shared = tempfile::tempdir().unwrap();
    let private = tempfile::tempdir().unwrap();
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::write(shared.path().join(f), b"image").unwrap();
    }
    std::fs::write(private.path().join("node.key"), b"secret").unwrap();
    let dirs = vec![shared.path().to_owned()];
    let q = QemuSpec {
        kernel: shared.path().join("vmlinuz"),
        initrd: Some(shared.path().join("initrd.img")),
        append: String::new(),
        disk: None,
        extra_args: Vec::new(),
        multifd_channels: 0,
    };
    q.check_incoming(&dirs).unwrap();
    let e = q.check_incoming(&[]).unwrap_err();
    assert!(e.contains("qemu.image_dirs is empty"), "{e}");
    // A disk outside the shared directories, also through `..`.
    let mut bad = q.clone();
    bad.disk = Some(
        shared
            .path()
            .join("..")
            .join(private.path().join("node.key")),
    );
    let e = bad.check_incoming(&dirs).unwrap_err();
    assert!(e.contains("not inside qemu.image_dirs"), "{e}");
    let mut bad = q.clone();
    bad.extra_args = vec!["-chardev".into(), "file,path=/etc/x".into()];
    let e = bad.check_incoming(&dirs).unwrap_err();
    assert!(e.contains("extra QEMU arguments"), "{e}");
    let mut bad = q;
    bad.kernel = shared.path().join("missing");
    assert!(bad.check_incoming(&dirs).is_err());
}

#[test]
fn heartbeats_parse_from_a_noisy_console() {
    let text = "boot noise\r\ndrift-guest ready\ndrift-heartbeat 1 uptime=0.51\n\
                drift-heartbeat 2 uptime=0.61\r\ngarbage drift-heartbeat x\ndrift-heartbeat 3\n";
    assert_eq!(parse_heartbeats(text), vec![1, 2, 3]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("serial.log");
    assert_eq!(last_heartbeat(&p), None);
    std::fs::write(&p, text).unwrap();
    assert_eq!(last_heartbeat(&p), Some(3));
}

#[test]
fn qemu_states_map_to_drift_states() {
    assert_eq!(run_state("running", true), RunState::Running);
    assert_eq!(run_state("inmigrate", false), RunState::Incoming);
    assert_eq!(run_state("postmigrate", false), RunState::Paused);
    assert_eq!(run_state("paused", false), RunState::Paused);
}

#[test]
fn own_process_ticks_are_readable() {
    assert!(process_ticks(std::process::id()).is_some());
}
