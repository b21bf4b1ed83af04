//! Benchmarks of the hot paths of drift-protocol: signing, verifying, encoding and decoding a
//! load report (gossiped by every host every interval), and building, encoding, decoding and
//! checking a 1 MiB page batch (the unit of a memory transfer), with blake3 over 1 MiB and a
//! 1 MiB memcpy as baselines for reading the batch figures as ratios.
//!
//! `cargo bench -p drift-protocol --bench codec`; short measurement times keep the whole run
//! around a minute.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use drift_protocol::codec::{encode_frame, FrameDecoder};
use drift_protocol::ids::NodeId;
use drift_protocol::keys::SecretKey;
use drift_protocol::report::LoadReport;
use drift_protocol::signed::Signed;
use drift_protocol::time::Timestamp;
use drift_protocol::transfer::{PageBatch, TransferFrame, MAX_PAGES_PER_BATCH, PAGE_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Bytes of guest memory one full batch covers.
const BATCH_BYTES: usize = MAX_PAGES_PER_BATCH * PAGE_SIZE;

fn report(node: NodeId) -> LoadReport {
    LoadReport {
        node,
        seq: 1_234_567,
        issued_at: Timestamp(1_800_000_000_000),
        roster_epoch: 42,
        cpu_permille: 731,
        mem_used_mib: 48_213,
        mem_total_mib: 65_536,
        power_mw: 187_500,
        power_measured: true,
        vm_count: 17,
        vm_demand_permille: 1_240,
        reserved_permille: 150,
        standby: false,
    }
}

fn load_report(c: &mut Criterion) {
    let key = SecretKey::from_bytes(&[7; 32]);
    let value = report(key.public());
    let signed = Signed::sign(&value, &key);
    let frame = encode_frame(&signed);
    let dec = FrameDecoder::default();

    let mut g = c.benchmark_group("load_report");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| Signed::sign(black_box(&value), &key)));
    g.bench_function("verify", |b| {
        b.iter(|| black_box(&signed).verify().expect("a valid report"))
    });
    g.bench_function("encode_frame", |b| {
        b.iter(|| encode_frame(black_box(&signed)))
    });
    g.bench_function("decode_frame", |b| {
        b.iter(|| {
            dec.decode_exact::<Signed<LoadReport>>(black_box(&frame))
                .expect("a valid frame")
        })
    });
    g.finish();
}

/// 256 pages: half random, a quarter zero, a quarter one repeated byte (compressible but not
/// zero), shuffled.
fn pages() -> Vec<(u64, Vec<u8>)> {
    let mut rng = StdRng::seed_from_u64(0xba7c4);
    let mut pages: Vec<(u64, Vec<u8>)> = (0..MAX_PAGES_PER_BATCH)
        .map(|i| {
            let page = match i % 4 {
                0 | 1 => {
                    let mut p = vec![0; PAGE_SIZE];
                    rng.fill_bytes(&mut p);
                    p
                }
                2 => vec![0; PAGE_SIZE],
                _ => vec![rng.gen_range(1..=255); PAGE_SIZE],
            };
            (rng.gen_range(0..1 << 20), page)
        })
        .collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.gen_range(0..=i));
    }
    pages
}

fn page_batch(c: &mut Criterion) {
    let pages = pages();
    let page_count = 1 << 20;
    let build = || PageBatch::build(3, pages.iter().map(|(pfn, p)| (*pfn, &p[..])));
    let frame = encode_frame(&TransferFrame::Pages(build()));
    let transfer_frame = TransferFrame::Pages(build());
    let dec = FrameDecoder::default();

    let mut g = c.benchmark_group("page_batch_1MiB");
    g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    g.bench_function("build (zero scan + blake3)", |b| b.iter(build));
    g.bench_function("encode_frame", |b| {
        b.iter(|| encode_frame(black_box(&transfer_frame)))
    });
    g.bench_function("decode_frame + check (blake3)", |b| {
        b.iter(|| {
            let TransferFrame::Pages(batch) = dec
                .decode_exact::<TransferFrame>(black_box(&frame))
                .expect("a valid frame")
            else {
                panic!("not a page batch");
            };
            batch.check(page_count).expect("a valid batch");
            batch
        })
    });
    g.finish();

    let mut memory = vec![0u8; BATCH_BYTES];
    StdRng::seed_from_u64(1).fill_bytes(&mut memory);
    let mut g = c.benchmark_group("baseline_1MiB");
    g.throughput(Throughput::Bytes(BATCH_BYTES as u64));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&memory))));
    let mut copy = vec![0u8; BATCH_BYTES];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            copy.copy_from_slice(black_box(&memory));
            black_box(&mut copy);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = load_report, page_batch
}
criterion_main!(benches);
