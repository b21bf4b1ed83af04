//! The mesh: the libp2p swarm, owned by one event loop task, and a cloneable [`Client`] that
//! sends it commands over a bounded channel and gets answers on oneshot channels.
//!
//! ```mermaid
//! flowchart LR
//!     monitor -- publish report --> client
//!     api[admin API] -- peers, push roster --> client
//!     client -- bounded mpsc --> loop[event loop: owns the Swarm]
//!     loop -- validate, Accept/Reject/Ignore --> gossipsub
//!     loop -- accepted reports --> table[(NodeState.table)]
//!     loop -- adopted rosters --> roster[(NodeState.roster)]
//! ```
//!
//! Every gossip message is validated by drift before gossipsub may forward it: a report that
//! fails is never forwarded; a forged one (`Reject`) lowers the forwarding peer's score, an
//! outdated one is dropped without penalty (`Ignore`).

mod bandwidth;
mod behaviour;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drift_protocol::codec::FrameDecoder;
use drift_protocol::report::{self, Freshness, Rejection};
use drift_protocol::roster::Announcement;
use drift_protocol::{NodeId, SecretKey, Timestamp};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ListenError, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use behaviour::{
    keypair, node_id, peer_id, AUDIT_HEAD_TOPIC, MAX_GOSSIP_MESSAGE, REPORT_TOPIC, ROSTER_TOPIC,
};
use behaviour::{Behaviour, BehaviourEvent};

use crate::state::{NodeState, RosterChange};

/// Commands waiting for the event loop at most.
const COMMAND_QUEUE: usize = 64;
/// How often unconnected bootstrap addresses are dialed again.
const REDIAL_EVERY: Duration = Duration::from_secs(3);
/// Pause between two attempts to open a stream to a peer.
const OPEN_RETRY: Duration = Duration::from_millis(250);
/// How often the node announces its roster chain.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(20);
/// How often this host's clock is judged against its peers' reports.
const CLOCK_JUDGED_EVERY: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the mesh needs to start.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub key: SecretKey,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub max_connections: u32,
    pub freshness: Freshness,
}

/// A connected peer, as `drift peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Roster name, if the peer is a member.
    pub name: Option<String>,
    pub addresses: Vec<String>,
    /// Whether this node dialed (`outbound`) or was dialed (`inbound`).
    pub direction: String,
    pub connected_for_ms: u64,
    pub agent: Option<String>,
}

/// Gossip topics a client may publish on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Reports,
    Roster,
    AuditHeads,
}

#[derive(Debug)]
enum Command {
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    RosterChanged(RosterChange),
    /// Closes every connection to a peer (it may reconnect later).
    Disconnect(libp2p::PeerId),
}

/// A handle to the mesh; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    metrics: Arc<Mutex<prometheus_client::registry::Registry>>,
    bytes: bandwidth::MeshBytes,
    streams: libp2p_stream::Control,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// The mesh stopped, or did not answer.
#[derive(Debug, thiserror::Error)]
#[error("the mesh event loop is not running")]
pub struct MeshStopped;

impl Client {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, MeshStopped> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| MeshStopped)?;
        rx.await.map_err(|_| MeshStopped)
    }

    /// Closes every connection to `peer` now. Dialling resumes as usual afterwards: this cuts
    /// the streams on those connections, as a network fault would.
    pub async fn disconnect(&self, peer: &NodeId) -> Result<(), MeshStopped> {
        self.commands
            .send(Command::Disconnect(peer_id(peer)))
            .await
            .map_err(|_| MeshStopped)
    }

    /// Publishes bytes on a topic. Errors such as "no peers yet" come back as `Err(String)`.
    pub async fn publish(
        &self,
        topic: Topic,
        data: Vec<u8>,
    ) -> Result<Result<(), String>, MeshStopped> {
        self.ask(|reply| Command::Publish { topic, data, reply })
            .await
    }

    /// The connected peers.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshStopped> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// The addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshStopped> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Tells the mesh a roster was adopted: admit new members, cut removed ones off.
    pub async fn roster_changed(&self, change: RosterChange) -> Result<(), MeshStopped> {
        self.commands
            .send(Command::RosterChanged(change))
            .await
            .map_err(|_| MeshStopped)
    }

    /// Opens and accepts raw streams (Noise-encrypted, to authenticated members only).
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// Opens a stream of `protocol` to `peer`, trying again until `within` has passed: a
    /// member known from the table may not be connected right now (the mesh dials its
    /// bootstrap peers again every few seconds), and a stream may land on a connection that is
    /// closing. The error is the last attempt's.
    pub async fn open_stream(
        &self,
        peer: &NodeId,
        protocol: libp2p::StreamProtocol,
        within: Duration,
    ) -> Result<tokio_util::compat::Compat<libp2p::Stream>, String> {
        use tokio_util::compat::FuturesAsyncReadCompatExt;
        let deadline = tokio::time::Instant::now() + within;
        let mut control = self.streams();
        loop {
            let attempt = tokio::time::timeout_at(
                deadline,
                control.open_stream(peer_id(peer), protocol.clone()),
            )
            .await;
            let error = match attempt {
                Ok(Ok(stream)) => return Ok(stream.compat()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if tokio::time::Instant::now() + OPEN_RETRY >= deadline {
                return Err(error);
            }
            tokio::time::sleep(OPEN_RETRY).await;
        }
    }

    /// Runs `f` on the registry of libp2p's metrics.
    pub fn with_registry<R>(
        &self,
        f: impl FnOnce(&prometheus_client::registry::Registry) -> R,
    ) -> R {
        f(&self.metrics.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Total bytes received and sent on the streams of all connections (after decryption and
    /// demultiplexing, all protocols): the counters `/metrics` shows as `drift_mesh_bytes_total`.
    pub fn bandwidth(&self) -> (u64, u64) {
        self.bytes.get()
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("transport setup failed: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: Multiaddr, message: String },
}

/// Builds the swarm, starts listening and spawns the event loop. The loop runs until `cancel`.
pub fn spawn(
    config: MeshConfig,
    state: Arc<NodeState>,
    cancel: CancellationToken,
) -> Result<(Client, tokio::task::JoinHandle<()>), MeshError> {
    let key = keypair(&config.key);
    let mut registry = prometheus_client::registry::Registry::default();
    let bytes = bandwidth::MeshBytes::registered(&mut registry);
    let insecure_open = state.insecure_open;
    let max_connections = config.max_connections;
    let mut swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            use libp2p::core::muxing::StreamMuxerBox;
            use libp2p::Transport as _;
            // TCP (Noise, yamux) and QUIC, as `with_tcp` and `with_quic` build them, with the
            // streams of every connection counted in `bytes`.
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            let both = tcp.or_transport(quic).map(|either, _| either.into_inner());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(bytes.count(both))
        })
        .map_err(|e| MeshError::Transport(e.to_string()))?
        .with_dns()
        .map_err(|e| MeshError::Transport(format!("DNS resolver: {e}")))?
        .with_bandwidth_metrics(&mut registry)
        .with_behaviour(|key| {
            Behaviour::new(key, insecure_open, max_connections)
                .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
        })
        .map_err(|e| MeshError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();

    let report_topic = IdentTopic::new(REPORT_TOPIC);
    let roster_topic = IdentTopic::new(ROSTER_TOPIC);
    let head_topic = IdentTopic::new(AUDIT_HEAD_TOPIC);
    for topic in [&report_topic, &roster_topic, &head_topic] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(topic)
            .map_err(|e| MeshError::Transport(e.to_string()))?;
    }
    if let Some(allow) = swarm.behaviour_mut().allow.as_mut() {
        for m in &state.roster().roster.members {
            allow.allow_peer(peer_id(&m.id));
        }
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| MeshError::Listen {
                addr: addr.clone(),
                message: e.to_string(),
            })?;
    }

    let streams = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let event_loop = EventLoop {
        swarm,
        state,
        commands: rx,
        bootstrap: config
            .bootstrap
            .iter()
            .map(|a| Bootstrap {
                peer: match a.iter().last() {
                    Some(Protocol::P2p(p)) => Some(p),
                    _ => None,
                },
                addr: a.clone(),
                last_dial: None,
            })
            .collect(),
        connected: HashMap::new(),
        listen_addrs: Vec::new(),
        report_topic,
        roster_topic,
        head_topic,
        freshness: config.freshness,
        cancel,
        last_announce: None,
        clock_judged: None,
        denials_audited: (Instant::now(), 0),
    };
    let handle = tokio::spawn(event_loop.run());
    Ok((
        Client {
            commands: tx,
            metrics: Arc::new(Mutex::new(registry)),
            bytes,
            streams,
        },
        handle,
    ))
}

#[derive(Debug)]
struct Bootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    last_dial: Option<Instant>,
}

#[derive(Debug)]
struct Connected {
    addresses: HashSet<Multiaddr>,
    dialed: HashSet<Multiaddr>,
    outbound: bool,
    since: Instant,
    connections: u32,
    agent: Option<String>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    state: Arc<NodeState>,
    commands: mpsc::Receiver<Command>,
    bootstrap: Vec<Bootstrap>,
    connected: HashMap<PeerId, Connected>,
    listen_addrs: Vec<Multiaddr>,
    report_topic: IdentTopic,
    roster_topic: IdentTopic,
    head_topic: IdentTopic,
    freshness: Freshness,
    cancel: CancellationToken,
    last_announce: Option<Instant>,
    /// When this host's clock was last judged against its peers'.
    clock_judged: Option<Instant>,
    /// Refused connections written to the audit log in the current minute (bounded, so a
    /// flood of strangers cannot fill the disk; the counter counts them all).
    denials_audited: (Instant, u32),
}

/// Refused connections audited per minute at most.
const MAX_DENIALS_AUDITED_PER_MIN: u32 = 20;

impl EventLoop {
    async fn run(mut self) {
        let mut redial = tokio::time::interval(REDIAL_EVERY);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                event = self.swarm.select_next_some() => self.on_event(event),
                _ = redial.tick() => self.dial_bootstrap(),
                _ = announce.tick() => self.announce_roster(),
            }
        }
        debug!("mesh event loop stopped");
    }

    fn dial_bootstrap(&mut self) {
        let now = Instant::now();
        for b in &mut self.bootstrap {
            let connected = match b.peer {
                Some(p) => self.connected.contains_key(&p),
                None => self.connected.values().any(|c| c.dialed.contains(&b.addr)),
            };
            if connected
                || b.last_dial
                    .is_some_and(|t| now.duration_since(t) < REDIAL_EVERY)
            {
                continue;
            }
            b.last_dial = Some(now);
            if let Err(e) = self.swarm.dial(b.addr.clone()) {
                debug!(addr = %b.addr, error = %e, "dial failed");
            }
        }
    }

    fn announce_roster(&mut self) {
        self.last_announce = Some(Instant::now());
        let data = self.state.roster().announcement().encode_frame();
        let topic = self.roster_topic.clone();
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, data) {
            debug!(error = %e, "roster announcement not sent");
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish { topic, data, reply } => {
                let topic = match topic {
                    Topic::Reports => self.report_topic.clone(),
                    Topic::Roster => self.roster_topic.clone(),
                    Topic::AuditHeads => self.head_topic.clone(),
                };
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, data)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            Command::Peers { reply } => {
                let now = Instant::now();
                let roster = self.state.roster();
                let mut peers: Vec<PeerInfo> = self
                    .connected
                    .iter()
                    .filter_map(|(peer, c)| {
                        let id = node_id(peer)?;
                        let mut addresses: Vec<String> =
                            c.addresses.iter().map(ToString::to_string).collect();
                        addresses.sort();
                        Some(PeerInfo {
                            id,
                            name: roster.roster.member(&id).map(|m| m.name.clone()),
                            addresses,
                            direction: if c.outbound { "outbound" } else { "inbound" }.into(),
                            connected_for_ms: now.duration_since(c.since).as_millis() as u64,
                            agent: c.agent.clone(),
                        })
                    })
                    .collect();
                peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
                let _ = reply.send(peers);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::RosterChanged(change) => {
                self.apply_roster_change(&change);
                self.announce_roster();
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    /// Brings admission in line with the roster in force now (not with the change that
    /// triggered this: a newer roster may have been adopted in between): members allowed,
    /// everyone else disallowed and disconnected.
    fn apply_roster_change(&mut self, change: &RosterChange) {
        info!(
            epoch = change.epoch,
            added = change.added.len(),
            removed = change.removed.len(),
            "adopted roster"
        );
        let members: HashSet<PeerId> = {
            let roster = self.state.roster();
            if roster.roster.member(&self.state.me).is_none() {
                warn!("this node is not in the roster in force: peers will refuse it");
            }
            roster
                .roster
                .members
                .iter()
                .map(|m| peer_id(&m.id))
                .collect()
        };
        let connected: Vec<PeerId> = self.connected.keys().copied().collect();
        let Some(allow) = self.swarm.behaviour_mut().allow.as_mut() else {
            return;
        };
        let stale: Vec<PeerId> = allow
            .allowed_peers()
            .iter()
            .filter(|p| !members.contains(p))
            .copied()
            .collect();
        for peer in &stale {
            allow.disallow_peer(*peer);
        }
        for peer in &members {
            allow.allow_peer(*peer);
        }
        for peer in connected.into_iter().filter(|p| !members.contains(p)) {
            info!(peer = %peer, "not a member any more: dropping its connections");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let acceptance = if message.topic == self.report_topic.hash() {
                    self.on_report(&message.data)
                } else if message.topic == self.roster_topic.hash() {
                    self.on_roster(&message.data)
                } else if message.topic == self.head_topic.hash() {
                    match crate::witness::on_head(&self.state, &message.data) {
                        crate::witness::Verdict::Accept => MessageAcceptance::Accept,
                        crate::witness::Verdict::Ignore => MessageAcceptance::Ignore,
                        crate::witness::Verdict::Reject => MessageAcceptance::Reject,
                    }
                } else {
                    MessageAcceptance::Reject
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            // A new neighbour on the roster topic: let it catch up soon (rate-limited).
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
                topic,
                ..
            })) if topic == self.roster_topic.hash()
                && self
                    .last_announce
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(2)) =>
            {
                self.announce_roster();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(
                libp2p::identify::Event::Received { peer_id, info, .. },
            )) => {
                if let Some(c) = self.connected.get_mut(&peer_id) {
                    c.agent = Some(info.agent_version);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                let c = self.connected.entry(peer_id).or_insert_with(|| {
                    debug!(peer = %peer_id, "connected");
                    Connected {
                        addresses: HashSet::new(),
                        dialed: HashSet::new(),
                        outbound: endpoint.is_dialer(),
                        since: Instant::now(),
                        connections: 0,
                        agent: None,
                    }
                });
                c.connections += 1;
                if endpoint.is_dialer() {
                    c.dialed.insert(addr.clone());
                }
                c.addresses.insert(addr);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.connected.remove(&peer_id);
                    debug!(peer = %peer_id, "disconnected");
                } else if let Some(c) = self.connected.get_mut(&peer_id) {
                    c.connections = num_established;
                }
            }
            SwarmEvent::IncomingConnectionError {
                error: ListenError::Denied { cause },
                send_back_addr,
                ..
            } => {
                self.state
                    .counters
                    .connections_denied
                    .fetch_add(1, Ordering::Relaxed);
                info!(from = %send_back_addr, reason = %cause, "refused connection");
                let now = Instant::now();
                if now.duration_since(self.denials_audited.0) >= Duration::from_secs(60) {
                    self.denials_audited = (now, 0);
                }
                if self.denials_audited.1 < MAX_DENIALS_AUDITED_PER_MIN {
                    self.denials_audited.1 += 1;
                    self.state.audit(drift_protocol::AuditEvent::Refused {
                        id: None,
                        peer: None,
                        reason: format!("connection from {send_back_addr} refused: {cause}"),
                    });
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, error = %error, "outgoing connection failed");
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            _ => {}
        }
    }

    fn on_report(&mut self, data: &[u8]) -> MessageAcceptance {
        let now = crate::clock::now();
        let verdict = {
            let roster = self.state.roster();
            let table = self.state.table();
            let ctx = report::Context {
                now,
                roster: &roster.roster,
                freshness: self.freshness,
            };
            report::validate(data, &ctx, |id| table.newest_seq(id))
        };
        let offset = match &verdict {
            Ok((_, report)) => Some((report.node, report.issued_at)),
            Err(Rejection::TooOld { node, age_ms }) => Some((*node, Timestamp(now.0 - age_ms))),
            Err(Rejection::FromFuture { node, ahead_ms }) => {
                Some((*node, now.plus_millis(*ahead_ms)))
            }
            Err(_) => None,
        };
        if let Some((node, issued_at)) = offset {
            lock(&self.state.skew).observe(node, issued_at, now);
            self.judge_own_clock(now);
        }
        match verdict {
            Ok((_, report)) => {
                self.state.table().insert(report, Instant::now());
                self.state
                    .counters
                    .reports_accepted
                    .fetch_add(1, Ordering::Relaxed);
                MessageAcceptance::Accept
            }
            Err(why) => {
                self.state.counters.reject(&why);
                debug!(reason = why.label(), error = %why, "report refused");
                if why.is_misbehaviour() {
                    MessageAcceptance::Reject
                } else {
                    MessageAcceptance::Ignore
                }
            }
        }
    }

    /// At most every [`CLOCK_JUDGED_EVERY`]: whether the peers' reports say this host's clock
    /// is off (beyond the skew a report may have); said in the log when that changes, and
    /// shown by `drift status`.
    fn judge_own_clock(&mut self, now: Timestamp) {
        if self
            .clock_judged
            .is_some_and(|t| t.elapsed() < CLOCK_JUDGED_EVERY)
        {
            return;
        }
        self.clock_judged = Some(Instant::now());
        let verdict = {
            let roster = self.state.roster();
            let mut skew = lock(&self.state.skew);
            skew.retain(|id| roster.roster.member(id).is_some());
            skew.verdict(
                now,
                drift_protocol::skew::Tolerance::for_freshness(&self.freshness),
            )
        };
        let mut said = lock(&self.state.clock_off);
        match (&*said, &verdict) {
            (_, Some(v))
                if said.is_none_or(|s| {
                    s.disagreeing != v.disagreeing
                        || (s.ahead_ms - v.ahead_ms).abs() > self.freshness.max_skew_ms as i64
                }) =>
            {
                warn!(ahead_ms = v.ahead_ms, "{}", v.describe());
            }
            (Some(_), None) => info!("this host's clock agrees with its peers' again"),
            _ => {}
        }
        *said = verdict;
    }

    fn on_roster(&mut self, data: &[u8]) -> MessageAcceptance {
        let Ok(announcement) =
            Announcement::decode_frame(&FrameDecoder::new(MAX_GOSSIP_MESSAGE), data)
        else {
            self.state
                .counters
                .rosters_refused
                .fetch_add(1, Ordering::Relaxed);
            return MessageAcceptance::Reject;
        };
        match self.state.adopt(&announcement.chain, crate::clock::now()) {
            Ok(Some(change)) => {
                self.apply_roster_change(&change);
                MessageAcceptance::Accept
            }
            Ok(None) => MessageAcceptance::Ignore,
            Err(e) => {
                self.state
                    .counters
                    .rosters_refused
                    .fetch_add(1, Ordering::Relaxed);
                debug!(error = %e, "roster announcement refused");
                match e {
                    drift_protocol::roster::RosterError::Signature(_) => MessageAcceptance::Reject,
                    _ => MessageAcceptance::Ignore,
                }
            }
        }
    }
}
