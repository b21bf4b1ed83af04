//! Post-copy recovery, the node's side (the protocol is
//! [`drift_protocol::transfer::recover`]): a post-copy migration whose link broke while both
//! nodes live goes on over a new one instead of losing the VM.
//!
//! - On the target, every incoming post-copy-capable transfer has a [`Door`]: closed while the
//!   link works; opened by the engine when the link breaks after the VM started running here.
//!   A recovery stream (`/drift/recover/1`) is let through only while its door is open, only
//!   from the offer's source, and only with an attempt newer than the last; its stream is
//!   handed to the waiting engine.
//! - On the source, the engine asks a [`Reconnect`] for a new link; the migration service
//!   opens the stream, signs the request and checks the target's signed answer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drift_protocol::transfer::recover::{
    check_recover_answer, validate_recover_request, RecoverAnswer, RecoverRefusal, RecoverRequest,
    Waiting,
};
use drift_protocol::{Hash, MigrationId, NodeId, SecretKey, Signed, Timestamp};
use libp2p::StreamProtocol;
use tokio::sync::mpsc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::link::Link;

/// The stream protocol of recovery requests.
pub const RECOVER_PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/recover/1");
/// How long either side keeps trying (the source) or waiting (the target) for a new link.
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a recovery stream may take to send its request, or to answer it.
pub const RECOVER_EXCHANGE: Duration = Duration::from_secs(10);
/// Recovery requests and answers are small.
const MAX_RECOVER_FRAME: usize = 4096;
/// A request issued longer ago than this is refused.
pub const MAX_REQUEST_AGE_MS: u64 = 30_000;
/// A request issued further in the future than this is refused.
pub const MAX_REQUEST_SKEW_MS: u64 = 5_000;

/// A stream a recovery goes on over (a `/drift/recover/1` stream, or a pipe in tests).
pub trait RecoveredStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> RecoveredStream for T {}

/// The stream a [`Door`] hands its engine.
pub type Recovered = Box<dyn RecoveredStream>;

/// What a source engine uses to get a new link to its target.
pub trait Reconnect: Sync {
    /// Opens attempt number `attempt` (1, 2, ...): a new link, once the target accepted it.
    fn reconnect(
        &self,
        attempt: u32,
    ) -> impl std::future::Future<Output = Result<Link, String>> + Send;
}

/// A source that never reconnects: a broken post-copy link is resolved with the target.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReconnect;

impl Reconnect for NoReconnect {
    async fn reconnect(&self, _attempt: u32) -> Result<Link, String> {
        Err("recovery is off".into())
    }
}

#[derive(Debug)]
struct DoorState {
    id: MigrationId,
    offer: Hash,
    source: NodeId,
    /// The newest attempt let through (0: none).
    last_attempt: u32,
    open: bool,
}

/// The target's door of one incoming transfer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Door {
    state: Arc<Mutex<DoorState>>,
    tx: mpsc::Sender<Recovered>,
    /// Wakes a waiting engine when the source gave up on recovering.
    give_up: Arc<tokio::sync::Notify>,
}

/// The engine's end of a [`Door`]: where new links arrive.
#[derive(Debug)]
pub struct DoorBell {
    door: Door,
    rx: mpsc::Receiver<Recovered>,
}

fn lock(m: &Mutex<DoorState>) -> std::sync::MutexGuard<'_, DoorState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Door {
    /// A closed door for the transfer `id` of `offer` from `source`, and its bell.
    pub fn new(id: MigrationId, offer: Hash, source: NodeId) -> (Door, DoorBell) {
        let (tx, rx) = mpsc::channel(1);
        let door = Door {
            state: Arc::new(Mutex::new(DoorState {
                id,
                offer,
                source,
                last_attempt: 0,
                open: false,
            })),
            tx,
            give_up: Arc::new(tokio::sync::Notify::new()),
        };
        (door.clone(), DoorBell { door, rx })
    }

    /// `from` asks what became of the migration instead of recovering it: if `from` is its
    /// source (which restarted, or whose attempts ran out) and the engine waits for a new
    /// link, it stops waiting. Returns whether it was waiting.
    pub fn abandon_if_waiting(&self, from: &NodeId) -> bool {
        let s = lock(&self.state);
        let open = s.open && &s.source == from;
        drop(s);
        if open {
            self.give_up.notify_one();
        }
        open
    }

    /// Checks a recovery request that arrived from `peer` at `now`; if it is let through, the
    /// door closes and the request's stream (once the answer is out) goes to the engine
    /// through the returned sender.
    pub fn admit(
        &self,
        signed: &Signed<RecoverRequest>,
        peer: &NodeId,
        me: &NodeId,
        now: Timestamp,
    ) -> Result<(RecoverRequest, mpsc::Sender<Recovered>), RecoverRefusal> {
        let mut s = lock(&self.state);
        let waiting = s.open.then(|| Waiting {
            id: s.id,
            offer: s.offer,
            source: s.source,
            last_attempt: s.last_attempt,
        });
        let req = validate_recover_request(
            signed,
            peer,
            me,
            waiting.as_ref(),
            now,
            MAX_REQUEST_AGE_MS,
            MAX_REQUEST_SKEW_MS,
        )?;
        s.last_attempt = req.attempt;
        s.open = false;
        Ok((req, self.tx.clone()))
    }
}

impl DoorBell {
    /// Opens the door and waits up to `timeout` for a new stream; the door is closed again
    /// when this returns or is dropped.
    pub async fn wait(&mut self, timeout: Duration) -> Option<Recovered> {
        // A link from an earlier opening that came too late is stale.
        while self.rx.try_recv().is_ok() {}
        lock(&self.door.state).open = true;
        let _closes = ClosesDoor(&self.door);
        let give_up = self.door.give_up.clone();
        tokio::select! {
            link = tokio::time::timeout(timeout, self.rx.recv()) => link.ok().flatten(),
            _ = give_up.notified() => None,
        }
    }
}

/// Closes a door when dropped: a wait that ends, or is given up, lets no stream in after.
struct ClosesDoor<'a>(&'a Door);

impl Drop for ClosesDoor<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).open = false;
    }
}

/// Why the source got no recovered stream.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{0}")]
    Io(String),
    #[error("the target refused: {0}")]
    Refused(RecoverRefusal),
    /// The answer is not the target's, or not for this request: worth auditing.
    #[error("the answer is not valid: {0}")]
    BadAnswer(RecoverRefusal),
}

/// Source: attempt `attempt` to carry migration `id` (of `offer`) on over a new stream to
/// `target`: a `/drift/recover/1` stream, a request signed with `key`, and the target's signed
/// answer. The stream, once accepted.
pub async fn open(
    mesh: &crate::mesh::Client,
    key: &SecretKey,
    target: NodeId,
    id: MigrationId,
    offer: Hash,
    attempt: u32,
) -> Result<tokio_util::compat::Compat<libp2p::Stream>, RecoverError> {
    use super::frames::{read_typed, write_typed};
    let request = RecoverRequest {
        id,
        offer,
        source: key.public(),
        target,
        attempt,
        issued_at: crate::clock::now(),
    };
    let signed = Signed::sign(&request, key);
    let mut stream = mesh
        .open_stream(&target, RECOVER_PROTOCOL, RECOVER_EXCHANGE)
        .await
        .map_err(RecoverError::Io)?;
    write_typed(&mut stream, &signed)
        .await
        .map_err(|e| RecoverError::Io(e.to_string()))?;
    let answer = tokio::time::timeout(
        RECOVER_EXCHANGE,
        read_typed::<_, Signed<RecoverAnswer>>(&mut stream, MAX_RECOVER_FRAME),
    )
    .await
    .map_err(|_| RecoverError::Io("no answer in time".into()))?
    .map_err(|e| RecoverError::Io(e.to_string()))?;
    match check_recover_answer(&answer, &signed, &request) {
        Ok(None) => Ok(stream),
        Ok(Some(why)) => Err(RecoverError::Refused(why)),
        Err(e) => Err(RecoverError::BadAnswer(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use drift_protocol::SecretKey;

    #[tokio::test]
    async fn a_door_lets_one_newer_attempt_of_its_source_through_only_while_open() {
        let source = SecretKey::from_bytes(&[1; 32]);
        let target = SecretKey::from_bytes(&[2; 32]).public();
        let id = MigrationId::from_bytes([3; 16]);
        let offer = Hash::of(b"offer");
        let (door, mut bell) = Door::new(id, offer, source.public());
        let now = crate::clock::now();
        let req = |attempt| {
            Signed::sign(
                &RecoverRequest {
                    id,
                    offer,
                    source: source.public(),
                    target,
                    attempt,
                    issued_at: now,
                },
                &source,
            )
        };
        // Closed while the link works.
        assert_eq!(
            door.admit(&req(1), &source.public(), &target, now)
                .unwrap_err(),
            RecoverRefusal::NotWaiting
        );
        let waiter = tokio::spawn(async move {
            let got = bell.wait(Duration::from_secs(5)).await.is_some();
            (got, bell)
        });
        // Opened by the engine; one attempt gets through.
        let mut admitted = None;
        for _ in 0..100 {
            match door.admit(&req(1), &source.public(), &target, now) {
                Ok(ok) => {
                    admitted = Some(ok);
                    break;
                }
                Err(RecoverRefusal::NotWaiting) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (got, tx) = admitted.expect("the door opened");
        assert_eq!(got.attempt, 1);
        // The same attempt again is refused (the door closed, and it is not newer).
        assert!(door.admit(&req(1), &source.public(), &target, now).is_err());
        let (a, b) = tokio::io::duplex(64);
        drop(b);
        tx.send(Box::new(a)).await.unwrap();
        let (arrived, mut bell) = waiter.await.unwrap();
        assert!(arrived);
        // Reopened: an old attempt is a replay, a newer one passes.
        let waiter = tokio::spawn(async move { bell.wait(Duration::from_millis(500)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            door.admit(&req(1), &source.public(), &target, now)
                .unwrap_err(),
            RecoverRefusal::Replayed
        );
        assert!(door.admit(&req(2), &source.public(), &target, now).is_ok());
        drop(waiter.await);
    }

    #[tokio::test]
    async fn a_source_that_resolves_instead_of_recovering_ends_the_wait_and_no_one_else_can() {
        let source = SecretKey::from_bytes(&[1; 32]).public();
        let other = SecretKey::from_bytes(&[5; 32]).public();
        let (door, mut bell) = Door::new(MigrationId::from_bytes([3; 16]), Hash::of(b"o"), source);
        // Not waiting: nothing to abandon.
        assert!(!door.abandon_if_waiting(&source));
        let waiter =
            tokio::spawn(async move { bell.wait(Duration::from_secs(30)).await.is_none() });
        let mut abandoned = false;
        for _ in 0..100 {
            // Another member cannot make the target give up.
            assert!(!door.abandon_if_waiting(&other));
            if door.abandon_if_waiting(&source) {
                abandoned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(abandoned);
        let ended = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(ended.unwrap().unwrap(), "the wait ended without a link");
    }
}
