//! Fuzz-style robustness of every decoder, with a counting allocator.
//!
//! Inputs are random bytes, mutated valid encodings (bit flips, interesting bytes, truncation,
//! insertion, deletion, duplicated chunks, a tampered frame length) and valid encodings whose
//! postcard length prefixes (and enum tags) were corrupted, also re-signed so the corruption
//! gets past the signature check into the inner decoder. Every input goes to every decoder; a
//! panic anywhere fails the test (nothing is caught), and so does a decode whose peak
//! allocation exceeds its bound (see [`Bound`]).
//!
//! `DRIFT_FUZZ_ITERS` (default 20 000) sets the number of inputs and `DRIFT_FUZZ_SEED` the seed
//! (printed; decimal or 0x-hex). Signature checks cost about 9 ms each where ed25519 is not
//! optimized, so there only one in `DRIFT_FUZZ_VERIFY_EVERY` (default 256; 1 where checks are
//! fast, as in release and in the workspace's dev profile, which optimizes dependencies) runs.
//! For a long run: `DRIFT_FUZZ_ITERS=1000000 cargo test --release -p drift-protocol --test
//! decode_robustness -- --nocapture`.
//!
//! The counting allocator is the `peakmem-alloc` crate: implementing `GlobalAlloc` needs
//! `unsafe impl`, and the workspace forbids unsafe code (a `forbid` that no `allow` can lift).

use std::alloc::System;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drift_protocol::audit::{AuditEvent, AuditRecord, Side};
use drift_protocol::codec::{self, encode_frame, DecodeError, FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::dataplane::{
    parse_pages_head, DataAnswer, DataBinding, DataEndpoint, DataFrame, MAX_PAGES_HEAD,
};
use drift_protocol::ids::{Hash, MigrationId, NodeId, VmId};
use drift_protocol::keys::SecretKey;
use drift_protocol::migration::{
    MigrationDecision, MigrationOffer, Mode, Placement, PlacementViolation, RejectReason, Verdict,
    VmSummary,
};
use drift_protocol::report::{self, Context, Freshness, LoadReport};
use drift_protocol::roster::{
    Capacity, Endorsed, EndorsedAnnouncement, Member, PlainAnnouncement, Role, Roster,
};
use drift_protocol::signed::{Signable, Signed};
use drift_protocol::time::Timestamp;
use drift_protocol::transfer::{
    Abort, AbortReason, Applied, Commit, Complete, DeviceState, MissingRanges, PageBatch,
    PageEntry, PageRequest, RoundEnd, Start, TransferFrame, MAX_PAGES_PER_BATCH, MAX_PAGE_REQUEST,
    PAGE_SIZE,
};
use peakmem_alloc::{PeakMemAlloc, PeakMemAllocTrait, INSTRUMENTED_SYSTEM};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::de::DeserializeOwned;
use serde::ser::{self, SerializeTuple};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[global_allocator]
static GLOBAL: &PeakMemAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The allocator's counters are process-wide: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` and returns its result with the most bytes it had allocated at once (what it keeps
/// included).
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    GLOBAL.reset_peak_memory();
    let r = f();
    (r, GLOBAL.get_peak_memory())
}

/// [`peak_of`], with the noise of other threads filtered out: the counters are process-wide,
/// and the test harness allocates on its own threads when it starts or reports a test. A
/// decoder is pure, so what it allocates is the same every run: the least of up to eight
/// runs, a millisecond apart, is its peak.
fn quiet_peak_of<R>(f: impl Fn() -> R) -> (R, usize) {
    let (mut result, mut peak) = peak_of(&f);
    for _ in 1..8 {
        if peak == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        let (r, p) = peak_of(&f);
        if p < peak {
            (result, peak) = (r, p);
        }
    }
    (result, peak)
}

// ---------------------------------------------------------------------------------------------
// Allocation bounds
// ---------------------------------------------------------------------------------------------

/// How much one decoder may allocate for an input of `len` bytes: `per_byte * len + fixed`.
///
/// postcard hands serde a sequence's length as a size hint only when that many bytes remain in
/// the input, and serde preallocates at most `hint * size_of::<Element>()` (and never more than
/// 1 MiB); past that a vector grows by doubling, so it can end up with twice the capacity it
/// needs. Every element consumes at least one input byte. So a sequence costs at most
/// `2 * size_of::<Element>()` per input byte, byte strings and strings one byte per byte, and
/// `per_byte` is the sum of what the decoder can reach. `fixed` covers allocations that do not
/// grow with the input: a vector's first small capacity (4 elements: about 500 bytes for
/// `Member`), a B-tree node of `(String, String)` (about 550 bytes), error values.
///
/// The counting allocator counts a `realloc` as its size difference (as if it grew in place),
/// so a doubling vector shows its final capacity, not old and new buffers at once.
#[derive(Debug, Clone, Copy)]
struct Bound {
    per_byte: usize,
    fixed: usize,
}

const FIXED: usize = 4 * 1024;

impl Bound {
    const fn new(per_byte: usize) -> Self {
        Self {
            per_byte,
            fixed: FIXED,
        }
    }

    /// A sequence of `T` (doubling growth), plus `extra` bytes per input byte.
    const fn seq_of<T>(extra: usize) -> Self {
        Self::new(2 * std::mem::size_of::<T>() + extra)
    }

    fn allows(&self, len: usize) -> usize {
        self.per_byte * len + self.fixed
    }

    /// What checking the signature adds: the signing input, a copy of the payload.
    const fn plus_signing_input(self) -> Self {
        Self {
            per_byte: self.per_byte + 1,
            fixed: self.fixed,
        }
    }
}

/// A `Signed<T>` envelope: one byte buffer for the payload; ids and signature are inline.
const ENVELOPE: Bound = Bound::new(1);
/// The inner payloads, decoded after the signature check (or, for announced rosters, before).
const LOAD_REPORT: Bound = Bound::new(0);
const COMPLETE_OR_COMMIT: Bound = Bound::new(0);
/// Rosters: `Vec<Member>`, and per member (39 bytes or more when it has a label) a B-tree node
/// of about 550 bytes (14 per byte), its name, roles and label strings (2 per byte).
const ROSTER: Bound = Bound::seq_of::<Member>(16);
/// Offers and decisions: `Vec<String>` placement lists and the strings themselves.
const OFFER_OR_DECISION: Bound = Bound::seq_of::<String>(1);
/// Audit records: strings only.
const AUDIT: Bound = Bound::new(1);
/// Transfer frames: `Vec<PageEntry>` (or `Vec<u64>`, half as big) and byte buffers.
const TRANSFER: Bound = Bound::seq_of::<PageEntry>(1);
/// Announcements: `Vec<Signed<Roster>>` and each envelope's payload buffer.
const ANNOUNCEMENT: Bound = Bound::seq_of::<Signed<Roster>>(1);
/// Announcements of endorsed epochs: `Vec<Endorsed>`, payload buffers and endorsements.
const ENDORSED_ANNOUNCEMENT: Bound = Bound::seq_of::<Endorsed>(1);
/// `report::validate`: the envelope and the signing input; a `LoadReport` allocates nothing.
const VALIDATE: Bound = Bound::new(2);
/// The checks of decoded values (hashes and ranges) allocate at most the leaves of one batch:
/// a 32-byte hash per entry, at most `MAX_PAGES_PER_BATCH` entries.
const CHECK: Bound = Bound {
    per_byte: 0,
    fixed: 32 * MAX_PAGES_PER_BATCH,
};

/// No decode may ever hold more than this, whatever the input.
/// `into_checked` of a batch's clone: the clone, a packed batch's expansion (at most a batch of
/// full pages, with its entries) and the leaves.
const EXPAND: Bound = Bound {
    per_byte: 2,
    fixed: MAX_PAGES_PER_BATCH * (PAGE_SIZE + 32 + 2 * std::mem::size_of::<PageEntry>()),
};

const HARD_LIMIT: usize = 2 * MAX_FRAME_LEN;

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy)]
struct DecoderStats {
    calls: u64,
    ok: u64,
    max_peak: usize,
    /// The input length at `max_peak`.
    max_peak_len: usize,
    /// The largest `peak / len` over inputs of at least 64 bytes, in hundredths.
    max_ratio_x100: usize,
}

#[derive(Debug, Default)]
struct Stats {
    by_decoder: BTreeMap<&'static str, DecoderStats>,
    kinds: [u64; 3],
    signature_checks: u64,
    signature_checks_skipped: u64,
    /// Inputs that decoded although they are not the value's own encoding, by decoder.
    non_canonical: BTreeMap<&'static str, u64>,
}

/// Where the fuzzer is, for failure messages.
#[derive(Debug, Clone, Copy)]
struct Origin {
    seed: u64,
    iteration: u64,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "input {} of DRIFT_FUZZ_SEED={:#x}",
            self.iteration, self.seed
        )
    }
}

impl Stats {
    /// Runs `decode` on `input`, checks its peak allocation against `bound` and the hard limit,
    /// records it, and returns its result.
    fn run<R>(
        &mut self,
        name: &'static str,
        bound: Bound,
        input: &[u8],
        origin: Origin,
        ok: impl Fn(&R) -> bool,
        decode: impl Fn() -> R,
    ) -> R {
        let len = input.len();
        let (mut result, mut peak) = peak_of(&decode);
        if peak > bound.allows(len) {
            // Measured again without another thread's allocations (see `quiet_peak_of`).
            (result, peak) = quiet_peak_of(&decode);
        }
        assert!(
            peak <= bound.allows(len) && peak <= HARD_LIMIT,
            "{name} allocated {peak} bytes for an input of {len} bytes (bound {} = {} * len + {}, \
             hard limit {HARD_LIMIT}); {origin}; input starts {}",
            bound.allows(len),
            bound.per_byte,
            bound.fixed,
            hex_prefix(input),
        );
        let s = self.by_decoder.entry(name).or_default();
        s.calls += 1;
        s.ok += u64::from(ok(&result));
        if peak > s.max_peak {
            s.max_peak = peak;
            s.max_peak_len = len;
        }
        if len >= 64 {
            s.max_ratio_x100 = s.max_ratio_x100.max(peak * 100 / len);
        }
        result
    }

    fn ok(&self, name: &str) -> u64 {
        self.by_decoder.get(name).map_or(0, |s| s.ok)
    }
}

fn hex_prefix(input: &[u8]) -> String {
    let shown = &input[..input.len().min(256)];
    let mut s: String = shown.iter().map(|b| format!("{b:02x}")).collect();
    if input.len() > shown.len() {
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// A postcard-compatible serializer that records where the varints are
// ---------------------------------------------------------------------------------------------

/// What a recorded varint encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkKind {
    /// The length of a string, byte string, sequence or map.
    Len,
    /// An enum variant's index.
    Variant,
    /// An integer field.
    Int,
}

/// A varint at `at`, `len` bytes long.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: usize,
    len: usize,
    kind: MarkKind,
}

/// Encodes like postcard (checked against it for every corpus value) and records every varint.
#[derive(Debug, Default)]
struct Recorder {
    out: Vec<u8>,
    marks: Vec<Mark>,
}

#[derive(Debug)]
struct RecordError(String);

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordError {}

impl ser::Error for RecordError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

impl Recorder {
    fn varint(&mut self, mut v: u64, kind: MarkKind) {
        let at = self.out.len();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.out.push(byte);
                break;
            }
            self.out.push(byte | 0x80);
        }
        self.marks.push(Mark {
            at,
            len: self.out.len() - at,
            kind,
        });
    }

    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64, MarkKind::Int);
    }
}

type RecordResult = Result<(), RecordError>;

impl Serializer for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn is_human_readable(&self) -> bool {
        false
    }
    fn serialize_bool(self, v: bool) -> RecordResult {
        self.out.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> RecordResult {
        self.out.push(v as u8);
        Ok(())
    }
    fn serialize_i16(self, v: i16) -> RecordResult {
        self.zigzag(v.into());
        Ok(())
    }
    fn serialize_i32(self, v: i32) -> RecordResult {
        self.zigzag(v.into());
        Ok(())
    }
    fn serialize_i64(self, v: i64) -> RecordResult {
        self.zigzag(v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> RecordResult {
        self.out.push(v);
        Ok(())
    }
    fn serialize_u16(self, v: u16) -> RecordResult {
        self.varint(v.into(), MarkKind::Int);
        Ok(())
    }
    fn serialize_u32(self, v: u32) -> RecordResult {
        self.varint(v.into(), MarkKind::Int);
        Ok(())
    }
    fn serialize_u64(self, v: u64) -> RecordResult {
        self.varint(v, MarkKind::Int);
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> RecordResult {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> RecordResult {
        self.out.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> RecordResult {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> RecordResult {
        self.serialize_bytes(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> RecordResult {
        self.varint(v.len() as u64, MarkKind::Len);
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> RecordResult {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, v: &T) -> RecordResult {
        self.out.push(1);
        v.serialize(self)
    }
    fn serialize_unit(self) -> RecordResult {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> RecordResult {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> RecordResult {
        self.varint(index.into(), MarkKind::Variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        v: &T,
    ) -> RecordResult {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        v: &T,
    ) -> RecordResult {
        self.varint(index.into(), MarkKind::Variant);
        v.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self, RecordError> {
        let len = len.ok_or_else(|| RecordError("sequence of unknown length".into()))?;
        self.varint(len as u64, MarkKind::Len);
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, RecordError> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, RecordError> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, RecordError> {
        self.varint(index.into(), MarkKind::Variant);
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self, RecordError> {
        let len = len.ok_or_else(|| RecordError("map of unknown length".into()))?;
        self.varint(len as u64, MarkKind::Len);
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, RecordError> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, RecordError> {
        self.varint(index.into(), MarkKind::Variant);
        Ok(self)
    }
}

impl ser::SerializeSeq for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeTuple for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeTupleStruct for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeTupleVariant for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeMap for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, k: &T) -> RecordResult {
        k.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeStruct for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut Recorder {
    type Ok = ();
    type Error = RecordError;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, v: &T) -> RecordResult {
        v.serialize(&mut **self)
    }
    fn end(self) -> RecordResult {
        Ok(())
    }
}

/// The postcard encoding of `value` and where its varints are.
fn record<T: Serialize>(value: &T) -> (Vec<u8>, Vec<Mark>) {
    let mut rec = Recorder::default();
    value.serialize(&mut rec).expect("corpus values encode");
    assert_eq!(
        rec.out,
        codec::encode_payload(value),
        "the recorder must encode exactly like postcard"
    );
    (rec.out, rec.marks)
}

// ---------------------------------------------------------------------------------------------
// Signing arbitrary bytes under a type's domain
// ---------------------------------------------------------------------------------------------

/// Arbitrary bytes that sign under `T`'s domain tag: they serialize as themselves (a tuple of
/// `u8` is raw bytes in postcard), so a member can sign junk exactly as a malicious peer would.
struct Raw<T>(Vec<u8>, PhantomData<fn() -> T>);

impl<T> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(self.0.len())?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de, T> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("Raw is only ever signed"))
    }
}

impl<T: Signable> Signable for Raw<T> {
    const DOMAIN: &'static str = T::DOMAIN;
}

/// The frame of a `Signed<T>` over `payload` (valid or not) by `key`.
fn signed_frame_of_raw<T: Signable>(payload: &[u8], key: &SecretKey) -> Vec<u8> {
    let (bytes, signer, sig) =
        Signed::sign(&Raw::<T>(payload.to_vec(), PhantomData), key).into_parts();
    debug_assert_eq!(bytes, payload);
    encode_frame(&Signed::<T>::from_parts(bytes, signer, sig))
}

// ---------------------------------------------------------------------------------------------
// Corpus
// ---------------------------------------------------------------------------------------------

/// One valid encoding to mutate.
struct Item {
    /// The whole frame.
    frame: Vec<u8>,
    /// The varints of the frame's payload (offsets within the frame).
    frame_marks: Vec<Mark>,
    /// For a signed object: its payload, the payload's varints, and how to re-sign it.
    signed: Option<SignedItem>,
}

struct SignedItem {
    payload: Vec<u8>,
    marks: Vec<Mark>,
    resign: fn(&[u8], &SecretKey) -> Vec<u8>,
}

fn item<T: Serialize>(value: &T) -> Item {
    let frame = encode_frame(value);
    let (payload, marks) = record(value);
    assert_eq!(&frame[codec::HEADER_LEN..], &payload[..]);
    let frame_marks = marks
        .into_iter()
        .map(|m| Mark {
            at: m.at + codec::HEADER_LEN,
            ..m
        })
        .collect();
    Item {
        frame,
        frame_marks,
        signed: None,
    }
}

fn signed_item<T: Signable>(value: &T, key: &SecretKey) -> Item {
    let (payload, marks) = record(value);
    let mut it = item(&Signed::sign(value, key));
    it.signed = Some(SignedItem {
        payload,
        marks,
        resign: signed_frame_of_raw::<T>,
    });
    it
}

/// The keys and the roster the corpus and `report::validate` use.
struct World {
    host: SecretKey,
    roster: Roster,
    now: Timestamp,
}

fn name(rng: &mut StdRng) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
    let len = rng.gen_range(1..=12);
    (0..len)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn node(rng: &mut StdRng) -> NodeId {
    SecretKey::generate(rng).public()
}

fn hash(rng: &mut StdRng) -> Hash {
    Hash(rng.gen())
}

fn mid(rng: &mut StdRng) -> MigrationId {
    MigrationId::from_bytes(rng.gen())
}

fn member(rng: &mut StdRng, id: NodeId, role: Role) -> Member {
    let labels = (0..rng.gen_range(0..4))
        .map(|_| (name(rng), name(rng)))
        .collect();
    Member {
        id,
        name: name(rng),
        roles: vec![role],
        labels,
        capacity: Capacity {
            cpus: rng.gen_range(1..256),
            mem_mib: rng.gen_range(1..1 << 20),
        },
    }
}

fn placement(rng: &mut StdRng) -> Placement {
    Placement {
        jurisdictions: (0..rng.gen_range(0..3)).map(|_| name(rng)).collect(),
        regions: (0..rng.gen_range(0..3)).map(|_| name(rng)).collect(),
        anti_affinity: rng.gen_bool(0.5).then(|| name(rng)),
    }
}

fn page(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..3) {
        0 => vec![0; PAGE_SIZE],
        1 => vec![rng.gen_range(1..=255); PAGE_SIZE],
        _ => {
            let mut p = vec![0; PAGE_SIZE];
            rng.fill_bytes(&mut p);
            p
        }
    }
}

fn corpus(rng: &mut StdRng) -> (World, Vec<Item>) {
    let host = SecretKey::generate(rng);
    let observer = SecretKey::generate(rng);
    let now = Timestamp(1_800_000_000_000);
    let roster = Roster {
        cluster: "fuzz".into(),
        epoch: 1,
        prev: None,
        not_before: Timestamp(0),
        not_after: Timestamp(u64::MAX),
        members: vec![
            member(rng, host.public(), Role::Host),
            member(rng, observer.public(), Role::Observer),
        ],
        admins: None,
    };
    let mut items = Vec::new();

    for seq in 1..=4 {
        let report = LoadReport {
            node: host.public(),
            seq,
            issued_at: Timestamp(now.0 - rng.gen_range(0..20_000)),
            roster_epoch: 1,
            cpu_permille: rng.gen_range(0..=1000),
            mem_used_mib: 1000,
            mem_total_mib: rng.gen_range(1000..1 << 20),
            power_mw: rng.gen_range(0..1 << 26),
            power_measured: rng.gen(),
            vm_count: rng.gen_range(0..64),
            vm_demand_permille: rng.gen_range(0..5000),
            reserved_permille: rng.gen_range(0..1000),
            standby: false,
        };
        items.push(signed_item(&report, &host));
    }

    let mut rosters = Vec::new();
    for epoch in 1..=3u64 {
        let mut members = vec![roster.members[0].clone(), roster.members[1].clone()];
        for _ in 0..rng.gen_range(0..4) {
            let id = node(rng);
            let role = if rng.gen() {
                Role::Host
            } else {
                Role::Observer
            };
            members.push(member(rng, id, role));
        }
        let r = Roster {
            cluster: "fuzz".into(),
            epoch,
            prev: (epoch > 1).then(|| hash(rng)),
            not_before: Timestamp(0),
            not_after: Timestamp(u64::MAX),
            members,
            admins: None,
        };
        items.push(signed_item(&r, &host));
        rosters.push(Signed::sign(&r, &host));
    }
    items.push(item(&PlainAnnouncement {
        chain: rosters.clone(),
    }));
    items.push(item(&PlainAnnouncement {
        chain: rosters[..1].to_vec(),
    }));
    let cosigner = SecretKey::generate(rng);
    items.push(item(&EndorsedAnnouncement {
        chain: rosters
            .iter()
            .map(|s| {
                let mut e = Endorsed::from(s.clone());
                e.endorse(&cosigner).expect("room for a signature");
                e
            })
            .collect(),
    }));

    let target = node(rng);
    for mode in [Mode::PreCopy, Mode::PostCopy, Mode::Hybrid] {
        let offer = MigrationOffer {
            id: mid(rng),
            source: host.public(),
            target,
            vm: VmSummary {
                id: VmId::from_bytes(rng.gen()),
                name: name(rng),
                memory_mib: rng.gen_range(1..1 << 16),
                vcpus: rng.gen_range(1..64),
                demand_permille: rng.gen_range(0..1000),
                placement: placement(rng),
                qemu: None,
            },
            mode,
            nonce: rng.gen(),
            issued_at: now,
            expires_at: now.plus_millis(10_000),
            roster_epoch: 1,
            data_connections: rng.gen_range(0..4),
        };
        items.push(signed_item(&offer, &host));
    }

    let verdicts = [
        Verdict::Accept {
            reserved_until: now.plus_millis(30_000),
            data: None,
        },
        Verdict::Accept {
            reserved_until: now.plus_millis(30_000),
            data: Some(DataEndpoint {
                port: 7401,
                addrs: vec!["10.0.0.2:7401".into(), "[::1]:7401".into()],
                connections: 2,
            }),
        },
        Verdict::Reject(RejectReason::Busy),
        Verdict::Reject(RejectReason::EpochMismatch { offer: 3, mine: 4 }),
        Verdict::Reject(RejectReason::Placement(PlacementViolation::Jurisdiction {
            host: Some("de".into()),
            allowed: vec!["fr".into(), "nl".into()],
        })),
        Verdict::Reject(RejectReason::Placement(PlacementViolation::AntiAffinity(
            "db".into(),
        ))),
    ];
    for verdict in verdicts {
        let decision = MigrationDecision {
            id: mid(rng),
            offer: hash(rng),
            source: target,
            target: host.public(),
            verdict,
            issued_at: now,
        };
        items.push(signed_item(&decision, &host));
    }

    let events = [
        AuditEvent::NodeStarted { roster_epoch: 1 },
        AuditEvent::RosterAdopted {
            epoch: 2,
            hash: hash(rng),
        },
        AuditEvent::OfferSent {
            id: mid(rng),
            vm: VmId::from_bytes(rng.gen()),
            target,
            mode: Mode::Hybrid,
            offer: hash(rng),
        },
        AuditEvent::OfferReceived {
            id: mid(rng),
            vm: VmId::from_bytes(rng.gen()),
            source: target,
            offer: hash(rng),
        },
        AuditEvent::Decision {
            id: mid(rng),
            accepted: false,
            reason: "no_capacity".into(),
        },
        AuditEvent::TransferStarted {
            id: mid(rng),
            side: Side::Source,
            peer: target,
        },
        AuditEvent::Switchover {
            id: mid(rng),
            side: Side::Target,
        },
        AuditEvent::Complete {
            id: mid(rng),
            side: Side::Source,
            root: hash(rng),
        },
        AuditEvent::Commit {
            id: mid(rng),
            side: Side::Target,
            root: hash(rng),
        },
        AuditEvent::Abort {
            id: mid(rng),
            side: Side::Source,
            reason: "timeout waiting for commit".into(),
        },
        AuditEvent::Refused {
            id: None,
            peer: Some(target),
            reason: "not a member".into(),
        },
    ];
    for (seq, event) in events.into_iter().enumerate() {
        let record = AuditRecord {
            seq: seq as u64,
            prev: hash(rng),
            at: now,
            event,
        };
        items.push(signed_item(&record, &host));
    }

    let complete = Complete {
        id: mid(rng),
        offer: hash(rng),
        root: hash(rng),
        page_count: 1 << 18,
    };
    let commit = Commit {
        id: mid(rng),
        root: hash(rng),
        committed_at: now,
    };
    items.push(signed_item(&complete, &host));
    items.push(signed_item(&commit, &host));
    let mut frames = vec![
        TransferFrame::Start(Start {
            id: mid(rng),
            offer: hash(rng),
            mode: Mode::PreCopy,
            page_size: PAGE_SIZE as u32,
            page_count: 1 << 18,
            data_connections: 2,
        }),
        TransferFrame::RoundEnd(RoundEnd {
            round: 3,
            pages_sent: 1000,
            dirty: 17,
        }),
        TransferFrame::Applied(Applied { round: 3 }),
        TransferFrame::Missing(MissingRanges {
            ranges: vec![(0, 4), (100, 1)],
            done: true,
        }),
        TransferFrame::DeviceState(DeviceState::new(
            (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
        )),
        TransferFrame::Complete(Signed::sign(&complete, &host)),
        TransferFrame::Commit(Signed::sign(&commit, &host)),
        TransferFrame::Abort(Abort {
            id: mid(rng),
            reason: AbortReason::BadBatch,
        }),
        TransferFrame::PageRequest(PageRequest {
            pfns: (0..rng.gen_range(0..24))
                .map(|_| rng.gen_range(0..1 << 18))
                .collect(),
        }),
    ];
    for pages in 0..=3 {
        let pages: Vec<(u64, Vec<u8>)> = (0..pages)
            .map(|_| (rng.gen_range(0..1 << 18), page(rng)))
            .collect();
        let batch = PageBatch::build(rng.gen(), pages.iter().map(|(pfn, p)| (*pfn, &p[..])));
        // Its packed form too, where a page packs (a page of one repeated byte does).
        let mut packed = batch.clone();
        packed.pack(&mut Vec::new());
        frames.push(TransferFrame::Pages(batch));
        if packed.is_packed() {
            frames.push(TransferFrame::Pages(packed));
        }
    }
    items.extend(frames.iter().map(item));
    // The data plane: bindings, answers, numbered frames.
    for index in 0..2 {
        let binding = DataBinding {
            id: mid(rng),
            offer: hash(rng),
            index,
            exporter: rng.gen(),
        };
        items.push(signed_item(&binding, &host));
    }
    items.push(item(&DataAnswer::Accepted));
    items.push(item(&DataAnswer::AlreadyOpen));
    for (seq, frame) in frames.iter().enumerate().take(4) {
        items.push(item(&DataFrame {
            seq: seq as u64 + 1,
            frame: frame.clone(),
        }));
    }

    (World { host, roster, now }, items)
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

const INTERESTING_BYTES: [u8; 6] = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe];

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Reads the varint at the start of `bytes` (up to 10 bytes; garbage is fine).
fn read_varint(bytes: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, b) in bytes.iter().take(10).enumerate() {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    v
}

/// A replacement for the varint `mark` of `data`: lengths that lie (by a little, by a lot, by
/// exactly the bytes that remain), overlong and non-canonical encodings, and random values.
fn tampered_varint(rng: &mut StdRng, data: &[u8], mark: Mark) -> Vec<u8> {
    let old = read_varint(&data[mark.at..]);
    let remaining = (data.len() - mark.at - mark.len) as u64;
    match rng.gen_range(0..16) {
        0 => varint(0),
        1 => varint(old + 1),
        2 => varint(old.saturating_sub(1)),
        3 => varint(remaining),
        4 => varint(remaining + 1),
        5 => varint(remaining / 2),
        6 => varint(u64::from(u32::MAX)),
        7 => varint(u64::from(u32::MAX) + 1),
        8 => varint(u64::MAX),
        9 => varint(MAX_FRAME_LEN as u64),
        10 => varint(rng.gen_range(0..1 << 24)),
        11 => {
            // The same value, non-canonically (a trailing zero group).
            let mut v = varint(old);
            if let Some(last) = v.last_mut() {
                *last |= 0x80;
            }
            v.push(0);
            v
        }
        12 => vec![0xff; rng.gen_range(5..=11)],
        13 => vec![0x80; rng.gen_range(1..=11)],
        14 => varint(rng.gen_range(0..1 << 14)),
        _ => varint(rng.gen()),
    }
}

/// Replaces one recorded varint of `data` (length prefixes mostly).
fn tamper_mark(rng: &mut StdRng, data: &mut Vec<u8>, marks: &[Mark]) {
    if marks.is_empty() {
        return;
    }
    let lens: Vec<&Mark> = marks.iter().filter(|m| m.kind == MarkKind::Len).collect();
    let mark = match rng.gen_range(0..10) {
        0..=6 if !lens.is_empty() => *lens[rng.gen_range(0..lens.len())],
        _ => marks[rng.gen_range(0..marks.len())],
    };
    let replacement = if mark.kind == MarkKind::Variant && rng.gen_bool(0.5) {
        varint(rng.gen_range(0..16))
    } else {
        tampered_varint(rng, data, mark)
    };
    data.splice(mark.at..mark.at + mark.len, replacement);
}

/// One generic mutation of `data`.
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>) {
    let len = data.len();
    match rng.gen_range(0..9) {
        0 if len > 0 => {
            for _ in 0..rng.gen_range(1..=4) {
                let bit = rng.gen_range(0..len * 8);
                data[bit / 8] ^= 1 << (bit % 8);
            }
        }
        1 if len > 0 => {
            for _ in 0..rng.gen_range(1..=4) {
                let at = rng.gen_range(0..len);
                data[at] = INTERESTING_BYTES[rng.gen_range(0..INTERESTING_BYTES.len())];
            }
        }
        2 => data.truncate(rng.gen_range(0..=len)),
        3 => {
            let at = rng.gen_range(0..=len);
            let junk: Vec<u8> = (0..rng.gen_range(1..=16)).map(|_| rng.gen()).collect();
            data.splice(at..at, junk);
        }
        4 if len > 0 => {
            let at = rng.gen_range(0..len);
            let end = (at + rng.gen_range(1..=16)).min(len);
            data.drain(at..end);
        }
        5 if len > 0 => {
            let at = rng.gen_range(0..len);
            let end = (at + rng.gen_range(1..=64)).min(len);
            let chunk = data[at..end].to_vec();
            let to = rng.gen_range(0..=data.len());
            data.splice(to..to, chunk);
        }
        6 => tamper_header(rng, data),
        7 => {
            // A second copy of itself (two frames back to back, or a doubled payload).
            let copy = data.clone();
            data.extend_from_slice(&copy);
        }
        _ => {
            let at = rng.gen_range(0..=len);
            data.insert(
                at,
                INTERESTING_BYTES[rng.gen_range(0..INTERESTING_BYTES.len())],
            );
        }
    }
}

/// Sets the frame header's length to a lie: zero, off by one, huge, the limit and past it.
fn tamper_header(rng: &mut StdRng, data: &mut Vec<u8>) {
    if data.len() < 4 {
        data.resize(4, 0);
    }
    let actual = (data.len() - 4) as u32;
    let len: u32 = match rng.gen_range(0..10) {
        0 => 0,
        1 => actual.wrapping_add(1),
        2 => actual.saturating_sub(1),
        3 => u32::MAX,
        4 => 0x8000_0000,
        5 => MAX_FRAME_LEN as u32,
        6 => MAX_FRAME_LEN as u32 + 1,
        7 => 1 << 24,
        8 => rng.gen_range(0..1 << 16),
        _ => rng.gen(),
    };
    data[..4].copy_from_slice(&len.to_be_bytes());
}

/// Makes the frame header's length match the bytes that follow it.
fn fix_header(data: &mut [u8]) {
    if data.len() >= 5 {
        let len = (data.len() - 4) as u32;
        data[..4].copy_from_slice(&len.to_be_bytes());
    }
}

/// Random bytes: short or up to 4 KiB, often behind a valid header (so they reach postcard),
/// sometimes starting with a small enum tag.
fn random_input(rng: &mut StdRng) -> Vec<u8> {
    let len = if rng.gen_bool(0.5) {
        rng.gen_range(0..=64)
    } else {
        rng.gen_range(0..=4096)
    };
    let mut data = vec![0; len];
    rng.fill_bytes(&mut data);
    if len >= 6 && rng.gen_bool(0.6) {
        data[4] = drift_protocol::PROTOCOL_VERSION;
        fix_header(&mut data);
        if rng.gen_bool(0.3) {
            data[5] = rng.gen_range(0..10);
        }
    }
    data
}

// ---------------------------------------------------------------------------------------------
// Running every decoder
// ---------------------------------------------------------------------------------------------

/// Whether a signature check may run now (all in release, one in `every` in debug).
struct SignatureBudget {
    every: u64,
    seen: u64,
}

impl SignatureBudget {
    fn allow(&mut self, stats: &mut Stats) -> bool {
        self.seen += 1;
        let run = self.seen.is_multiple_of(self.every);
        if run {
            stats.signature_checks += 1;
        } else {
            stats.signature_checks_skipped += 1;
        }
        run
    }
}

struct Fuzz<'a> {
    stats: Stats,
    /// The signed type (0..7) whose signature check runs for this input even when its payload
    /// does not decode.
    verify_pick: usize,
    budget: SignatureBudget,
    world: &'a World,
    origin: Origin,
}

impl Fuzz<'_> {
    /// Checks a value that decoded: it re-encodes to a frame that decodes to the same value
    /// (counting inputs that were accepted without being the canonical encoding).
    fn re_encodes<T>(&mut self, name: &'static str, input: &[u8], value: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let frame = encode_frame(value);
        if frame != input {
            *self.stats.non_canonical.entry(name).or_default() += 1;
            let again: T = FrameDecoder::default()
                .decode_exact(&frame)
                .expect("a decoded value re-encodes to a valid frame");
            assert_eq!(&again, value, "{}", self.origin);
        }
    }

    /// `decode` and `decode_exact` of `T` on `input`, which must agree.
    fn frame_decoders<T>(
        &mut self,
        names: [&'static str; 2],
        bound: Bound,
        input: &[u8],
    ) -> Option<T>
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let dec = FrameDecoder::default();
        let origin = self.origin;
        let prefix = self.stats.run(
            names[0],
            bound,
            input,
            origin,
            |r: &Result<Option<(T, usize)>, DecodeError>| matches!(r, Ok(Some(_))),
            || dec.decode::<T>(input),
        );
        let exact = self.stats.run(
            names[1],
            bound,
            input,
            origin,
            |r: &Result<T, DecodeError>| r.is_ok(),
            || dec.decode_exact::<T>(input),
        );
        match (&prefix, &exact) {
            (Ok(Some((v, used))), Ok(e)) => {
                assert_eq!(*used, input.len(), "{origin}");
                assert_eq!(v, e, "{origin}");
            }
            (Ok(Some((_, used))), Err(DecodeError::TrailingBytes(n))) => {
                assert_eq!(used + n, input.len(), "{origin}");
            }
            (Ok(Some((_, used))), Err(e)) => {
                panic!(
                    "decode took {used} of {} bytes but decode_exact says {e:?}; {origin}",
                    input.len()
                )
            }
            (Ok(None), Ok(_)) => panic!("decode wants more, decode_exact decoded; {origin}"),
            (Err(a), Ok(_)) => panic!("decode failed ({a:?}), decode_exact decoded; {origin}"),
            (Err(a), Err(b)) => assert_eq!(a, b, "{origin}"),
            (Ok(None), Err(_)) => {}
        }
        let value = exact.ok()?;
        self.re_encodes(names[1], input, &value);
        Some(value)
    }

    /// The inner decoder of a decoded envelope, and (within the budget) its verification,
    /// which must agree with it.
    fn signed_inner<T>(
        &mut self,
        names: [&'static str; 2],
        inner: Bound,
        signed: &Signed<T>,
        always_verify: bool,
    ) where
        T: Signable + PartialEq + std::fmt::Debug,
    {
        let origin = self.origin;
        let payload = signed.payload();
        let decoded = self.stats.run(
            names[0],
            inner,
            payload,
            origin,
            |r: &Result<T, DecodeError>| r.is_ok(),
            || T::decode(payload),
        );
        // A signature check can only hand out a value when the payload decodes: those always
        // get one; envelopes whose payload does not (their check must fail) get one under the
        // type picked for this input. (Verifying every envelope under all eight domains would
        // cost eight signature checks per input for no more coverage: the inner decoding is
        // `Signable::decode`, which runs above for every type.)
        if (decoded.is_ok() || always_verify) && self.budget.allow(&mut self.stats) {
            let verified = self.stats.run(
                names[1],
                inner.plus_signing_input(),
                payload,
                origin,
                |r: &Result<T, _>| r.is_ok(),
                || signed.verify(),
            );
            if let Ok(v) = verified {
                assert_eq!(decoded.as_ref(), Ok(&v), "{origin}");
            }
        }
    }

    /// The envelope decoders of `T` (the `index`th signed type), then its inner decoder and
    /// signature check.
    fn envelope<T>(
        &mut self,
        index: usize,
        names: [&'static str; 4],
        inner: Bound,
        input: &[u8],
    ) -> Option<Signed<T>>
    where
        T: Signable + PartialEq + std::fmt::Debug,
    {
        let signed = self.frame_decoders::<Signed<T>>([names[0], names[1]], ENVELOPE, input)?;
        let always = index == self.verify_pick;
        self.signed_inner([names[2], names[3]], inner, &signed, always);
        Some(signed)
    }

    fn all(&mut self, input: &[u8]) {
        let origin = self.origin;
        let report = self.envelope::<LoadReport>(
            0,
            [
                "decode Signed<LoadReport>",
                "decode_exact Signed<LoadReport>",
                "payload LoadReport",
                "verify Signed<LoadReport>",
            ],
            LOAD_REPORT,
            input,
        );
        self.envelope::<Roster>(
            1,
            [
                "decode Signed<Roster>",
                "decode_exact Signed<Roster>",
                "payload Roster",
                "verify Signed<Roster>",
            ],
            ROSTER,
            input,
        );
        self.envelope::<MigrationOffer>(
            2,
            [
                "decode Signed<MigrationOffer>",
                "decode_exact Signed<MigrationOffer>",
                "payload MigrationOffer",
                "verify Signed<MigrationOffer>",
            ],
            OFFER_OR_DECISION,
            input,
        );
        self.envelope::<MigrationDecision>(
            3,
            [
                "decode Signed<MigrationDecision>",
                "decode_exact Signed<MigrationDecision>",
                "payload MigrationDecision",
                "verify Signed<MigrationDecision>",
            ],
            OFFER_OR_DECISION,
            input,
        );
        self.envelope::<AuditRecord>(
            4,
            [
                "decode Signed<AuditRecord>",
                "decode_exact Signed<AuditRecord>",
                "payload AuditRecord",
                "verify Signed<AuditRecord>",
            ],
            AUDIT,
            input,
        );
        // Complete and Commit travel inside transfer frames, but decode on their own too.
        self.envelope::<Complete>(
            5,
            [
                "decode Signed<Complete>",
                "decode_exact Signed<Complete>",
                "payload Complete",
                "verify Signed<Complete>",
            ],
            COMPLETE_OR_COMMIT,
            input,
        );
        self.envelope::<Commit>(
            6,
            [
                "decode Signed<Commit>",
                "decode_exact Signed<Commit>",
                "payload Commit",
                "verify Signed<Commit>",
            ],
            COMPLETE_OR_COMMIT,
            input,
        );

        self.envelope::<DataBinding>(
            7,
            [
                "decode Signed<DataBinding>",
                "decode_exact Signed<DataBinding>",
                "payload DataBinding",
                "verify Signed<DataBinding>",
            ],
            COMPLETE_OR_COMMIT,
            input,
        );

        if let Some(frame) = self.frame_decoders::<TransferFrame>(
            ["decode TransferFrame", "decode_exact TransferFrame"],
            TRANSFER,
            input,
        ) {
            self.transfer_checks(input, &frame);
        }
        if let Some(numbered) = self.frame_decoders::<DataFrame>(
            ["decode DataFrame", "decode_exact DataFrame"],
            TRANSFER,
            input,
        ) {
            self.transfer_checks(input, &numbered.frame);
        }
        let _ = self.frame_decoders::<DataAnswer>(
            ["decode DataAnswer", "decode_exact DataAnswer"],
            COMPLETE_OR_COMMIT,
            input,
        );
        // How a data connection reads a numbered Pages frame: its head first (the payload's
        // start, up to MAX_PAGES_HEAD bytes), the length the frame's header announced.
        if let Some(payload) = input.get(codec::HEADER_LEN..) {
            let start = &payload[..payload.len().min(MAX_PAGES_HEAD)];
            let head = self.stats.run(
                "parse_pages_head",
                TRANSFER,
                input,
                origin,
                |r: &Result<Option<_>, _>| matches!(r, Ok(Some(_))),
                || parse_pages_head(start, payload.len()),
            );
            // A head that parses is the start of a frame that decodes whole, and vice versa
            // for Pages frames.
            if let Ok(Some(head)) = head {
                let data = payload[head.head_len..head.head_len + head.data_len].to_vec();
                let hash: [u8; 32] = payload[payload.len() - 32..]
                    .try_into()
                    .expect("a parsed head leaves room for the hash");
                let whole = codec::decode_payload::<DataFrame>(payload);
                assert_eq!(
                    whole.as_ref().ok(),
                    Some(&head.into_frame(data, hash)),
                    "{origin}"
                );
            }
        }

        let _ = self.frame_decoders::<EndorsedAnnouncement>(
            [
                "decode EndorsedAnnouncement",
                "decode_exact EndorsedAnnouncement",
            ],
            ENDORSED_ANNOUNCEMENT,
            input,
        );
        if let Some(announcement) = self.frame_decoders::<PlainAnnouncement>(
            ["decode Announcement", "decode_exact Announcement"],
            ANNOUNCEMENT,
            input,
        ) {
            // What `roster::advance` decodes before any signature check.
            for signed in &announcement.chain {
                let payload = signed.payload();
                let _ = self.stats.run(
                    "payload Roster (announced, unverified)",
                    ROSTER,
                    payload,
                    origin,
                    |r: &Result<Roster, DecodeError>| r.is_ok(),
                    || <Roster as Signable>::decode(payload),
                );
            }
        }

        // `validate` checks a signature only for a well-formed report by a roster host: that
        // is the costly case the budget covers.
        let costly = report
            .as_ref()
            .is_some_and(|s| s.signer() == &self.world.host.public() && input.len() <= 512);
        if !costly || self.budget.allow(&mut self.stats) {
            let ctx = Context {
                now: self.world.now,
                roster: &self.world.roster,
                freshness: Freshness::default(),
            };
            let result = self.stats.run(
                "report::validate",
                VALIDATE,
                input,
                origin,
                |r: &Result<_, _>| r.is_ok(),
                || report::validate(input, &ctx, |_| Some(1)),
            );
            if let Ok((signed, value)) = result {
                // Accepted: it decoded as a report, from the host, that verifies.
                assert_eq!(report.as_ref(), Some(&signed), "{origin}");
                assert_eq!(
                    signed.verify_by(&self.world.host.public()),
                    Ok(value),
                    "{origin}"
                );
            }
        }
    }

    fn transfer_checks(&mut self, input: &[u8], frame: &TransferFrame) {
        let origin = self.origin;
        match frame {
            TransferFrame::Pages(batch) => {
                let [any, small] = [u64::MAX, 1 << 18].map(|page_count| {
                    self.stats.run(
                        "PageBatch::check",
                        CHECK,
                        input,
                        origin,
                        |r: &Result<(), _>| r.is_ok(),
                        || batch.check(page_count),
                    )
                });
                // A smaller VM can only refuse more.
                assert!(any.is_ok() || small.is_err(), "{origin}");
                if any.is_ok() {
                    let full = batch.pages().filter(|(_, d)| d.is_some()).count();
                    assert_eq!(batch.data.len(), full * PAGE_SIZE, "{origin}");
                    assert!(batch.entries.len() <= MAX_PAGES_PER_BATCH, "{origin}");
                }
                // How a node takes a batch: expanded (if packed), then checked. What it takes
                // holds no packed page, and an unpacked batch is taken exactly when it checks.
                let taken = self.stats.run(
                    "PageBatch::into_checked",
                    EXPAND,
                    input,
                    origin,
                    |r: &Result<_, _>| r.is_ok(),
                    || batch.clone().into_checked(u64::MAX),
                );
                if let Ok(checked) = &taken {
                    assert!(!checked.batch().is_packed(), "{origin}");
                    assert_eq!(checked.batch().hash, batch.hash, "{origin}");
                }
                if !batch.is_packed() {
                    assert_eq!(taken.is_ok(), any.is_ok(), "{origin}");
                }
            }
            TransferFrame::DeviceState(d) => {
                let r = self.stats.run(
                    "DeviceState::check",
                    CHECK,
                    input,
                    origin,
                    |r: &Result<(), _>| r.is_ok(),
                    || d.check(),
                );
                if r.is_ok() {
                    assert_eq!(d, &DeviceState::new(d.bytes.clone()), "{origin}");
                }
            }
            TransferFrame::PageRequest(req) => {
                let [any, small] = [u64::MAX, 1 << 18].map(|page_count| {
                    self.stats.run(
                        "PageRequest::check",
                        CHECK,
                        input,
                        origin,
                        |r: &Result<(), _>| r.is_ok(),
                        || req.check(page_count),
                    )
                });
                assert!(any.is_ok() || small.is_err(), "{origin}");
                if any.is_ok() {
                    assert!(req.pfns.len() <= MAX_PAGE_REQUEST, "{origin}");
                }
            }
            TransferFrame::Complete(s) => self.signed_inner(
                [
                    "payload Complete (in frame)",
                    "verify Signed<Complete> (in frame)",
                ],
                COMPLETE_OR_COMMIT,
                s,
                true,
            ),
            TransferFrame::Commit(s) => self.signed_inner(
                [
                    "payload Commit (in frame)",
                    "verify Signed<Commit> (in frame)",
                ],
                COMPLETE_OR_COMMIT,
                s,
                true,
            ),
            TransferFrame::Stale(stale) => {
                assert!(
                    stale.ranges.len() <= drift_protocol::transfer::MAX_STALE_RANGES,
                    "{origin}"
                );
            }
            TransferFrame::Missing(m) => {
                assert!(
                    m.ranges.len() <= drift_protocol::transfer::MAX_STALE_RANGES,
                    "{origin}"
                );
            }
            TransferFrame::Start(_)
            | TransferFrame::RoundEnd(_)
            | TransferFrame::Abort(_)
            | TransferFrame::Applied(_) => {}
        }
    }
}

/// Whether ed25519 runs optimized here (a release build, or a dev profile that optimizes
/// dependencies, as the workspace's does): about 50 us a check, against about 9 ms unoptimized.
fn signature_checks_are_fast() -> bool {
    if !cfg!(debug_assertions) {
        return true;
    }
    let key = SecretKey::from_bytes(&[1; 32]);
    let commit = Commit {
        id: MigrationId::from_bytes([2; 16]),
        root: Hash([3; 32]),
        committed_at: Timestamp(4),
    };
    let signed = Signed::sign(&commit, &key);
    let started = Instant::now();
    for _ in 0..4 {
        assert!(signed.verify().is_ok());
    }
    started.elapsed().as_millis() < 8
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim().replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        }
        Err(_) => default,
    }
}

/// One input: random bytes, a mutated valid frame, or a valid encoding with a corrupted length
/// prefix (re-signed when it is a signed payload). Returns the kind (0, 1, 2).
fn next_input(rng: &mut StdRng, items: &[Item], key: &SecretKey) -> (usize, Vec<u8>) {
    let it = &items[rng.gen_range(0..items.len())];
    match rng.gen_range(0..100) {
        0..=19 => (0, random_input(rng)),
        20..=59 => {
            let mut data = it.frame.clone();
            if rng.gen_bool(0.3) {
                tamper_mark(rng, &mut data, &it.frame_marks);
            }
            for _ in 0..rng.gen_range(1..=3) {
                mutate(rng, &mut data);
            }
            if rng.gen_bool(0.5) {
                fix_header(&mut data);
            }
            (1, data)
        }
        _ => {
            let mut data = match &it.signed {
                Some(s) => {
                    let mut payload = s.payload.clone();
                    tamper_mark(rng, &mut payload, &s.marks);
                    if rng.gen_bool(0.2) {
                        mutate(rng, &mut payload);
                    }
                    (s.resign)(&payload, key)
                }
                None => {
                    let mut frame = it.frame.clone();
                    tamper_mark(rng, &mut frame, &it.frame_marks);
                    fix_header(&mut frame);
                    frame
                }
            };
            if rng.gen_bool(0.1) {
                mutate(rng, &mut data);
            }
            (2, data)
        }
    }
}

#[test]
fn every_decoder_survives_junk_within_its_allocation_bound() {
    let _serial = serial();
    let iterations = env_u64("DRIFT_FUZZ_ITERS", 20_000);
    let seed = env_u64("DRIFT_FUZZ_SEED", 0x00d1_f7f0_220c_0de5);
    let every = env_u64(
        "DRIFT_FUZZ_VERIFY_EVERY",
        if signature_checks_are_fast() { 1 } else { 256 },
    )
    .max(1);
    println!(
        "decode_robustness: seed={seed:#x} iterations={iterations} signature checks 1 in {every} \
         (DRIFT_FUZZ_SEED, DRIFT_FUZZ_ITERS, DRIFT_FUZZ_VERIFY_EVERY)"
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let (world, items) = corpus(&mut rng);
    let mut fuzz = Fuzz {
        stats: Stats::default(),
        verify_pick: 0,
        budget: SignatureBudget { every, seen: 0 },
        world: &world,
        origin: Origin { seed, iteration: 0 },
    };
    let mut max_len = 0;
    for iteration in 0..iterations {
        fuzz.origin.iteration = iteration;
        let (kind, input) = next_input(&mut rng, &items, &world.host);
        fuzz.verify_pick = rng.gen_range(0..8);
        fuzz.stats.kinds[kind] += 1;
        max_len = max_len.max(input.len());
        fuzz.all(&input);
    }
    let elapsed = started.elapsed();

    let s = &fuzz.stats;
    for (name, d) in &s.by_decoder {
        println!(
            "  {name:<42} calls {:>8} ok {:>8} max peak {:>8} B (input {:>5} B) max peak/len {}.{:02}",
            d.calls,
            d.ok,
            d.max_peak,
            d.max_peak_len,
            d.max_ratio_x100 / 100,
            d.max_ratio_x100 % 100
        );
    }
    let peak = s.by_decoder.values().map(|d| d.max_peak).max().unwrap_or(0);
    println!(
        "decode_robustness summary: iterations={iterations} seed={seed:#x} \
         inputs random/mutated/inner={}/{}/{} (max {max_len} B) decoded ok: \
         Signed<LoadReport>={} Signed<Roster>={} Signed<MigrationOffer>={} \
         Signed<MigrationDecision>={} Signed<AuditRecord>={} TransferFrame={} Announcement={} \
         validate={}; payloads ok: LoadReport={} Roster={} MigrationOffer={} \
         MigrationDecision={} AuditRecord={}; signature checks {} (skipped {}); \
         non-canonical accepted {:?}; peak allocation {peak} B; {:.1} s",
        s.kinds[0],
        s.kinds[1],
        s.kinds[2],
        s.ok("decode_exact Signed<LoadReport>"),
        s.ok("decode_exact Signed<Roster>"),
        s.ok("decode_exact Signed<MigrationOffer>"),
        s.ok("decode_exact Signed<MigrationDecision>"),
        s.ok("decode_exact Signed<AuditRecord>"),
        s.ok("decode_exact TransferFrame"),
        s.ok("decode_exact Announcement"),
        s.ok("report::validate"),
        s.ok("payload LoadReport"),
        s.ok("payload Roster"),
        s.ok("payload MigrationOffer"),
        s.ok("payload MigrationDecision"),
        s.ok("payload AuditRecord"),
        s.signature_checks,
        s.signature_checks_skipped,
        s.non_canonical,
        elapsed.as_secs_f64(),
    );

    // The run must have reached the deep paths, or it proves little.
    if iterations >= 10_000 {
        for name in [
            "decode_exact Signed<LoadReport>",
            "decode_exact Signed<Roster>",
            "decode_exact Signed<MigrationOffer>",
            "decode_exact Signed<MigrationDecision>",
            "decode_exact Signed<AuditRecord>",
            "decode_exact TransferFrame",
            "decode_exact Announcement",
            "decode_exact EndorsedAnnouncement",
            "decode_exact Signed<DataBinding>",
            "decode_exact DataFrame",
            "decode_exact DataAnswer",
            "parse_pages_head",
            "payload DataBinding",
            "payload Roster",
            "payload MigrationOffer",
            "payload MigrationDecision",
            "payload AuditRecord",
            "PageBatch::check",
            "DeviceState::check",
            "PageRequest::check",
        ] {
            assert!(s.ok(name) > 0, "no input decoded as {name}");
        }
        for name in ["verify Signed<LoadReport>", "report::validate"] {
            assert!(s.ok(name) > 0, "no input passed {name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers that claim huge frames
// ---------------------------------------------------------------------------------------------

/// Runs every frame decoder on `input` and returns the largest peak allocation.
fn peak_of_every_decoder(input: &[u8]) -> usize {
    let dec = FrameDecoder::default();
    let mut peaks = Vec::new();
    let mut note = |p: usize| peaks.push(p);
    macro_rules! both {
        ($t:ty) => {{
            let (r, p) = quiet_peak_of(|| dec.decode::<$t>(input).map(|o| o.is_some()));
            note(p);
            let (e, q) = quiet_peak_of(|| dec.decode_exact::<$t>(input).is_ok());
            note(q);
            (r, e)
        }};
    }
    let results = [
        both!(Signed<LoadReport>),
        both!(Signed<Roster>),
        both!(Signed<MigrationOffer>),
        both!(Signed<MigrationDecision>),
        both!(Signed<AuditRecord>),
        both!(TransferFrame),
        both!(PlainAnnouncement),
        both!(EndorsedAnnouncement),
    ];
    for (r, exact) in results {
        assert!(!exact, "a frame header alone decoded");
        assert!(!matches!(r, Ok(true)), "a frame header alone decoded");
    }
    peaks.into_iter().max().unwrap_or(0)
}

#[test]
fn a_header_claiming_4_gib_is_refused_before_allocating() {
    let _serial = serial();
    let dec = FrameDecoder::default();
    for header in [
        &[0xff, 0xff, 0xff, 0xff][..],
        &[0xff, 0xff, 0xff, 0xff, 1],
        &[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0],
        &[0x80, 0, 0, 0, 1, 7, 0xff, 0xff, 0xff, 0xff, 0x0f],
        &[0, 0x20, 0, 1, 1, 0],
    ] {
        let (r, peak) = quiet_peak_of(|| dec.decode::<TransferFrame>(header));
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(
            r,
            Err(DecodeError::TooLarge {
                len,
                max: MAX_FRAME_LEN
            })
        );
        assert_eq!(
            peak, 0,
            "allocated {peak} bytes to refuse a {len}-byte frame"
        );
        assert_eq!(peak_of_every_decoder(header), 0);
        // The gossip validator refuses it the same way, without allocating either.
        let world_roster = Roster {
            cluster: "c".into(),
            epoch: 1,
            prev: None,
            not_before: Timestamp(0),
            not_after: Timestamp(1),
            members: vec![],
            admins: None,
        };
        let ctx = Context {
            now: Timestamp(0),
            roster: &world_roster,
            freshness: Freshness::default(),
        };
        let (r, peak) = quiet_peak_of(|| report::validate(header, &ctx, |_| None).map(|_| ()));
        assert!(matches!(
            r,
            Err(report::Rejection::Malformed(DecodeError::TooLarge { .. }))
        ));
        assert_eq!(peak, 0);
    }
    // A header at the limit with no body yet: "need more", nothing allocated.
    let at_limit = [&(MAX_FRAME_LEN as u32).to_be_bytes()[..], &[1, 0]].concat();
    let (r, peak) = quiet_peak_of(|| dec.decode::<Signed<Roster>>(&at_limit));
    assert_eq!(r, Ok(None));
    assert_eq!(peak, 0);
    let (r, peak) = quiet_peak_of(|| dec.decode_exact::<Signed<Roster>>(&at_limit));
    assert_eq!(
        r,
        Err(DecodeError::Truncated {
            need: MAX_FRAME_LEN + 4,
            have: at_limit.len()
        })
    );
    assert_eq!(peak, 0);
    assert_eq!(peak_of_every_decoder(&at_limit), 0);
}

// ---------------------------------------------------------------------------------------------
// Maximal frames built to allocate as much as possible
// ---------------------------------------------------------------------------------------------

/// A frame of `MAX_FRAME_LEN` bytes of payload: `prefix`, then a varint count of as many `unit`s
/// as fit, then those units.
fn max_frame(prefix: &[u8], unit: &[u8], suffix: &[u8]) -> (Vec<u8>, usize) {
    let room = MAX_FRAME_LEN - 1 - prefix.len() - suffix.len() - 4;
    let count = room / unit.len();
    let mut payload = prefix.to_vec();
    payload.extend(varint(count as u64));
    for _ in 0..count {
        payload.extend_from_slice(unit);
    }
    payload.extend_from_slice(suffix);
    let mut frame = vec![0, 0, 0, 0, drift_protocol::PROTOCOL_VERSION];
    frame.extend_from_slice(&payload);
    fix_header(&mut frame);
    assert!(frame.len() <= MAX_FRAME_LEN + 4);
    (frame, count)
}

/// What one worst case cost: input length, peak allocation, time, and its decoder's bound.
type WorstCase = (&'static str, usize, usize, Duration, Bound);

/// [`peak_of`], and how long it took.
fn peak_and_time<R>(f: impl FnOnce() -> R) -> (R, usize, Duration) {
    let started = Instant::now();
    let (r, peak) = peak_of(f);
    (r, peak, started.elapsed())
}

/// The worst inputs found by analysis, at the largest frame the codec accepts: sequences far
/// beyond their limits, which the decoders must refuse while reading them.
fn worst_cases() -> Vec<WorstCase> {
    let dec = FrameDecoder::default();
    let mut out = Vec::new();
    let key = SecretKey::from_bytes(&[9; 32]);
    let id = *key.public().as_bytes();

    // A page request of ~2 M page numbers of one byte each: a `Vec<u64>` of 16 MiB.
    let (frame, count) = max_frame(&[7], &[0], &[]);
    let (r, peak, took) = peak_and_time(|| dec.decode_exact::<TransferFrame>(&frame));
    assert!(r.is_err(), "a page request of {count} pfns decoded");
    out.push((
        "TransferFrame::PageRequest, 1-byte pfns",
        frame.len(),
        peak,
        took,
        TRANSFER,
    ));

    // A page batch of ~1 M zero-page entries of two bytes each: a `Vec<PageEntry>` of 16 MiB.
    let (frame, count) = max_frame(&[1, 0], &[0, 0], &[0; 33]);
    let (r, peak, took) = peak_and_time(|| dec.decode_exact::<TransferFrame>(&frame));
    assert!(r.is_err(), "a batch of {count} entries decoded");
    out.push((
        "TransferFrame::Pages, zero-page entries",
        frame.len(),
        peak,
        took,
        TRANSFER,
    ));

    // An announcement of as many empty signed rosters as fit (97 bytes each).
    let mut unit = vec![0];
    unit.extend_from_slice(&id);
    unit.extend_from_slice(&[0; 64]);
    let (frame, count) = max_frame(&[], &unit, &[]);
    let (r, peak, took) = peak_and_time(|| dec.decode_exact::<PlainAnnouncement>(&frame));
    assert!(r.is_err(), "an announcement of {count} rosters decoded");
    out.push((
        "Announcement, empty envelopes",
        frame.len(),
        peak,
        took,
        ANNOUNCEMENT,
    ));

    // A roster payload of as many minimal members with one empty label as fit (39 bytes each).
    let mut unit = id.to_vec();
    unit.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0]);
    // cluster "c", epoch 1, no prev, not_before 0, not_after 1, then the members.
    let (frame, count) = max_frame(&[1, b'c', 1, 0, 0, 1], &unit, &[]);
    let payload = &frame[5..];
    let (r, peak, took) = peak_and_time(|| <Roster as Signable>::decode(payload));
    assert!(r.is_err(), "a roster of {count} members decoded");
    out.push((
        "Roster payload, one-label members",
        payload.len(),
        peak,
        took,
        ROSTER,
    ));

    // An offer payload whose placement lists ~2 M empty jurisdictions (decoded by
    // `Signed::verify` once the signature checks out, whoever the signer is).
    let offer = MigrationOffer {
        id: MigrationId::from_bytes([1; 16]),
        source: key.public(),
        target: key.public(),
        vm: VmSummary {
            id: VmId::from_bytes([2; 16]),
            name: "vm".into(),
            memory_mib: 1,
            vcpus: 1,
            demand_permille: 1,
            placement: Placement::default(),
            qemu: None,
        },
        mode: Mode::PreCopy,
        nonce: [0; 16],
        issued_at: Timestamp(1),
        expires_at: Timestamp(2),
        roster_epoch: 1,
        data_connections: 0,
    };
    let (encoded, marks) = record(&offer);
    // The jurisdictions' length prefix is the first Len mark after the VM name's.
    let lens: Vec<&Mark> = marks.iter().filter(|m| m.kind == MarkKind::Len).collect();
    let jur = lens[1];
    let prefix = &encoded[..jur.at];
    let suffix = &encoded[jur.at + jur.len..];
    let (frame, count) = max_frame(prefix, &[0], suffix);
    let payload = &frame[5..];
    let (r, peak, took) = peak_and_time(|| codec::decode_payload::<MigrationOffer>(payload));
    assert!(r.is_err(), "an offer with {count} jurisdictions decoded");
    out.push((
        "MigrationOffer payload, empty jurisdictions",
        payload.len(),
        peak,
        took,
        OFFER_OR_DECISION,
    ));

    // The largest signed envelope: its payload buffer.
    let signer_and_signature = [&id[..], &[0; 64]].concat();
    let (frame, _) = max_frame(&[], &[0], &signer_and_signature);
    let (r, peak, took) = peak_and_time(|| {
        dec.decode::<Signed<AuditRecord>>(&frame)
            .map(|o| o.is_some())
    });
    assert!(r.is_ok(), "{r:?}");
    out.push((
        "Signed<AuditRecord> envelope",
        frame.len(),
        peak,
        took,
        ENVELOPE,
    ));
    out
}

/// Even the worst inputs stay within the proportional bound of their decoder.
#[test]
fn maximal_frames_allocate_in_proportion_to_their_length() {
    let _serial = serial();
    for (what, len, peak, took, bound) in worst_cases() {
        println!(
            "worst case: {what:<46} input {len:>8} B  peak {peak:>9} B  ({:.1} x input, bound {} \
             x)  {:.1} ms",
            peak as f64 / len as f64,
            bound.per_byte,
            took.as_secs_f64() * 1000.0
        );
        assert!(
            peak <= bound.allows(len),
            "{what}: {peak} bytes for {len} bytes of input, bound {}",
            bound.allows(len)
        );
    }
}

/// The stricter property: no frame the codec accepts makes a decoder hold more than twice the
/// frame limit (every sequence from the wire is bounded while it is decoded).
#[test]
fn no_frame_makes_a_decoder_hold_more_than_twice_the_frame_limit() {
    let _serial = serial();
    for (what, len, peak, _, _) in worst_cases() {
        assert!(
            peak <= HARD_LIMIT,
            "{what}: {peak} bytes for {len} bytes of input, more than {HARD_LIMIT}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Canonical encodings
// ---------------------------------------------------------------------------------------------

/// A signed report's frame with its payload's length prefix re-encoded with a needless trailing
/// zero group (`0x80 | low, 0x00`): the same value, other bytes.
fn overlong_report_frame() -> (Signed<LoadReport>, Vec<u8>, Vec<u8>) {
    let key = SecretKey::from_bytes(&[5; 32]);
    let report = LoadReport {
        node: key.public(),
        seq: 7,
        issued_at: Timestamp(1_000),
        roster_epoch: 1,
        cpu_permille: 10,
        mem_used_mib: 1,
        mem_total_mib: 2,
        power_mw: 3,
        power_measured: true,
        vm_count: 0,
        vm_demand_permille: 0,
        reserved_permille: 0,
        standby: false,
    };
    let signed = Signed::sign(&report, &key);
    let frame = encode_frame(&signed);
    let (_, marks) = record(&signed);
    let len = marks[0];
    assert_eq!(len.kind, MarkKind::Len);
    let at = codec::HEADER_LEN + len.at;
    let mut overlong = varint(read_varint(&frame[at..]));
    if let Some(last) = overlong.last_mut() {
        *last |= 0x80;
    }
    overlong.push(0);
    let mut other = frame.clone();
    other.splice(at..at + len.len, overlong);
    fix_header(&mut other);
    (signed, frame, other)
}

/// Whatever bytes an envelope arrived in, it is the same object: same value, same signature,
/// same `Signed::hash` (which hashes the parsed parts, never the frame), so identities stay
/// canonical even though frames are not.
#[test]
fn an_envelope_is_identified_by_its_parts_not_its_frame_bytes() {
    let _serial = serial();
    let (signed, frame, other) = overlong_report_frame();
    assert_ne!(frame, other);
    let dec = FrameDecoder::default();
    if let Ok(decoded) = dec.decode_exact::<Signed<LoadReport>>(&other) {
        assert_eq!(decoded, signed);
        assert_eq!(decoded.hash(), signed.hash());
        assert_eq!(decoded.verify(), signed.verify());
    }
}

/// The stricter property: only the canonical encoding of a frame decodes, so that equal
/// objects are equal bytes (gossip deduplicates by bytes).
#[test]
fn only_the_canonical_encoding_of_a_frame_decodes() {
    let _serial = serial();
    let (_, _, other) = overlong_report_frame();
    let decoded = FrameDecoder::default().decode_exact::<Signed<LoadReport>>(&other);
    assert!(
        decoded.is_err(),
        "a non-canonical frame decoded: {decoded:?}"
    );
}
