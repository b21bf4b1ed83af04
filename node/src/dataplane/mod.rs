//! The data plane: TLS 1.3 connections, apart from the mesh, that carry migrations' bytes
//! (the protocol: [`drift_protocol::dataplane`]; the keys: [`tls`]).
//!
//! [`DataPlane`] owns the node's data listener and the table of the connections it expects:
//! one entry per accepted offer, made before the decision goes out and removed when the
//! migration ends ([`Expectation`]'s drop). A connection is taken only if, in this order:
//!
//! 1. its TLS handshake completes within [`HANDSHAKE_TIMEOUT`] with a roster member's key
//!    (a stranger, or a proxy with its own key, fails here);
//! 2. its first record, at most [`MAX_BINDING_FRAME`] bytes, is a [`DataBinding`] signed by
//!    that same key over this session's exporter value (else `bad_binding`: garbage,
//!    oversized, forged or replayed from another connection);
//! 3. the binding names an accepted, unfinished migration here (`unknown_migration`) whose
//!    source is that key (`not_the_source`), an index below the granted count
//!    (`beyond_agreed`) and not taken yet (`already_open`).
//!
//! Every refusal is answered (when the connection can still carry it), audited with its
//! reason, and costs at most one handshake: nothing of the VM is read before the binding
//! holds. Pending handshakes are bounded ([`MAX_PENDING`]); a connection that is neither
//! bound nor refused within the timeout is dropped.

pub mod tls;

use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use drift_protocol::dataplane::{
    validate_binding, DataAnswer, DataBinding, DataEndpoint, EXPORTER_LABEL, EXPORTER_LEN,
    MAX_ANSWER_FRAME, MAX_BINDING_FRAME, MAX_DATA_CONNECTIONS,
};
use drift_protocol::{AuditEvent, Hash, MigrationId, NodeId, SecretKey, Signed};
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::migration::frames::{read_typed, write_typed};
use crate::state::NodeState;

/// A data connection, either end: TLS over TCP, that [`DataPlane::cut`] can sever.
pub struct DataStream {
    tls: tokio_rustls::TlsStream<TcpStream>,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for DataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataStream")
    }
}

impl DataStream {
    fn new(tls: tokio_rustls::TlsStream<TcpStream>, cut: CancellationToken) -> Self {
        Self {
            tls,
            cut: Box::pin(cut.cancelled_owned()),
        }
    }

    /// An error once the connection was cut; registers for the cut otherwise.
    fn poll_cut(&mut self, cx: &mut std::task::Context<'_>) -> Option<std::io::Error> {
        self.cut.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "data connection cut")
        })
    }
}

impl tokio::io::AsyncRead for DataStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for DataStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.poll_cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The handshake and the binding must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a source tries to reach one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Incoming connections in their handshake or binding at once; more are closed unread.
pub const MAX_PENDING: usize = 32;

/// Why a data connection could not be made (source side).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no address to dial")]
    NoAddress,
    #[error("cannot reach {addr}: {error}")]
    Unreachable { addr: SocketAddr, error: String },
    #[error("TLS with {addr}: {error}")]
    Tls { addr: SocketAddr, error: String },
    #[error("the target refused the connection: {0}")]
    Refused(&'static str),
    #[error("binding the connection: {0}")]
    Binding(std::io::Error),
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// What the node expects for one accepted offer.
#[derive(Debug)]
struct Expected {
    source: NodeId,
    offer: Hash,
    connections: u32,
    /// Bit `i`: connection `i` was bound (shared with a QEMU tunnel's channel claims).
    claims: Arc<AtomicU64>,
    deliver: mpsc::Sender<(u32, DataStream)>,
}

type Table = Arc<Mutex<HashMap<MigrationId, Expected>>>;

fn lock(t: &Table) -> std::sync::MutexGuard<'_, HashMap<MigrationId, Expected>> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// The connections one accepted offer may bind, as they are bound. Dropping it ends the
/// offer's entry: later connections for it are refused (`unknown_migration`).
#[derive(Debug)]
pub struct Expectation {
    table: Table,
    id: MigrationId,
    /// Bound connections with their index, at most the granted count.
    pub bound: mpsc::Receiver<(u32, DataStream)>,
}

impl Drop for Expectation {
    fn drop(&mut self) {
        lock(&self.table).remove(&self.id);
    }
}

impl Expectation {
    /// Waits for connections `0..n`, in index order, for at most `within`.
    pub async fn all(&mut self, n: u32, within: Duration) -> Result<Vec<DataStream>, String> {
        let mut got: Vec<Option<DataStream>> = (0..n).map(|_| None).collect();
        let wait = async {
            let mut have = 0;
            while have < n {
                let Some((i, stream)) = self.bound.recv().await else {
                    return Err("the migration ended".to_string());
                };
                if let Some(slot) = got.get_mut(i as usize) {
                    have += u32::from(slot.is_none());
                    *slot = Some(stream);
                }
            }
            Ok(())
        };
        tokio::time::timeout(within, wait)
            .await
            .map_err(|_| format!("not every one of {n} data connections arrived in time"))??;
        Ok(got.into_iter().flatten().collect())
    }
}

/// The node's data plane.
pub struct DataPlane {
    state: Arc<NodeState>,
    key: SecretKey,
    acceptor: TlsAcceptor,
    local: SocketAddr,
    advertise: Vec<SocketAddr>,
    connections: u32,
    table: Table,
    clients: Mutex<HashMap<NodeId, Arc<ClientConfig>>>,
    pending: Arc<Semaphore>,
    /// Per peer: cancelled to sever every data connection with it ([`DataPlane::cut`]).
    cuts: Mutex<HashMap<NodeId, CancellationToken>>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("local", &self.local)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("data.listen {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// What the data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub listen: SocketAddr,
    pub advertise: Vec<SocketAddr>,
    /// Connections per sandbox migration.
    pub connections: u32,
}

impl DataPlane {
    /// Binds the data listener and starts taking connections until `cancel`.
    pub async fn start(
        config: DataConfig,
        key: SecretKey,
        state: Arc<NodeState>,
        cancel: CancellationToken,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), DataPlaneError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| DataPlaneError::Bind {
                    addr: config.listen,
                    cause: source,
                })?;
        let local = listener
            .local_addr()
            .map_err(|source| DataPlaneError::Bind {
                addr: config.listen,
                cause: source,
            })?;
        let members = state.clone();
        let server = tls::server_config(
            &key,
            Arc::new(move |id: &NodeId| members.roster().roster.member(id).is_some()),
        )?;
        let plane = Arc::new(Self {
            state,
            key,
            acceptor: TlsAcceptor::from(server),
            local,
            advertise: config.advertise,
            connections: config.connections.clamp(1, MAX_DATA_CONNECTIONS.min(64)),
            table: Arc::new(Mutex::new(HashMap::new())),
            clients: Mutex::new(HashMap::new()),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            cuts: Mutex::new(HashMap::new()),
        });
        info!(addr = %local, "data plane listening");
        let task = tokio::spawn(plane.clone().accept_loop(listener, cancel));
        Ok((plane, task))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections per sandbox migration.
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// What a decision announces for a migration granted `connections` connections.
    pub fn endpoint(&self, connections: u32) -> DataEndpoint {
        let addrs = if !self.advertise.is_empty() {
            self.advertise.iter().map(ToString::to_string).collect()
        } else if self.local.ip().is_unspecified() {
            Vec::new()
        } else {
            vec![self.local.to_string()]
        };
        DataEndpoint {
            port: self
                .advertise
                .first()
                .map_or(self.local.port(), SocketAddr::port),
            addrs,
            connections,
        }
    }

    /// Registers an accepted offer's connections: up to `connections`, from `source` only.
    /// `claims` records which indices were bound (share it with anything else that may bind
    /// the same indices).
    pub fn expect(
        &self,
        id: MigrationId,
        source: NodeId,
        offer: Hash,
        connections: u32,
        claims: Arc<AtomicU64>,
    ) -> Expectation {
        let connections = connections.min(MAX_DATA_CONNECTIONS);
        let (deliver, bound) = mpsc::channel(connections.max(1) as usize);
        lock(&self.table).insert(
            id,
            Expected {
                source,
                offer,
                connections,
                claims,
                deliver,
            },
        );
        Expectation {
            table: self.table.clone(),
            id,
            bound,
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "data listener");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Too many handshakes at once: closed before a byte is read.
            let Ok(permit) = self.pending.clone().try_acquire_owned() else {
                debug!(%addr, "too many pending data connections; closed");
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, this.bind_incoming(tcp)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(r)) => this.audit_refusal(addr, r),
                    Err(_) => this.audit_refusal(
                        addr,
                        Refusal {
                            id: None,
                            peer: None,
                            label: "timeout",
                            detail: format!(
                                "no handshake and binding within {HANDSHAKE_TIMEOUT:?}"
                            ),
                        },
                    ),
                }
                drop(permit);
            });
        }
    }

    fn audit_refusal(&self, addr: SocketAddr, r: Refusal) {
        info!(%addr, reason = r.label, detail = %r.detail, "refused a data connection");
        self.state.audit(AuditEvent::Refused {
            id: r.id,
            peer: r.peer,
            reason: format!(
                "data connection from {addr} refused: {} ({})",
                r.label, r.detail
            ),
        });
    }

    /// Handshake, binding, answer; a bound connection goes to its migration.
    async fn bind_incoming(&self, tcp: TcpStream) -> Result<(), Refusal> {
        let mut tls = self.acceptor.accept(tcp).await.map_err(|e| Refusal {
            id: None,
            peer: None,
            label: "tls",
            detail: e.to_string(),
        })?;
        let (peer, exporter) = {
            let (_, conn) = tls.get_ref();
            let peer = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tls::node_of(c.as_ref()));
            let exporter = conn
                .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
                .ok();
            (peer, exporter)
        };
        let (Some(peer), Some(exporter)) = (peer, exporter) else {
            return Err(Refusal {
                id: None,
                peer,
                label: "tls",
                detail: "no peer key or exporter after the handshake".into(),
            });
        };
        let refuse = |id, answer: DataAnswer, detail: String| Refusal {
            id,
            peer: Some(peer),
            label: answer.label(),
            detail,
        };
        let signed = match read_typed::<_, Signed<DataBinding>>(&mut tls, MAX_BINDING_FRAME).await {
            Ok(s) => s,
            Err(e) => {
                let _ = write_typed(&mut tls, &DataAnswer::BadBinding).await;
                return Err(refuse(
                    None,
                    DataAnswer::BadBinding,
                    format!("first record: {e}"),
                ));
            }
        };
        let binding = match validate_binding(&signed, &peer, &exporter) {
            Ok(b) => b,
            Err(e) => {
                let _ = write_typed(&mut tls, &DataAnswer::BadBinding).await;
                return Err(refuse(None, DataAnswer::BadBinding, e.to_string()));
            }
        };
        let deliver = match self.claim(&peer, &binding) {
            Ok(deliver) => deliver,
            Err(answer) => {
                let _ = write_typed(&mut tls, &answer).await;
                let _ = tls.shutdown().await;
                return Err(refuse(
                    Some(binding.id),
                    answer,
                    format!(
                        "connection {} of migration {}",
                        binding.index,
                        binding.id.short()
                    ),
                ));
            }
        };
        write_typed(&mut tls, &DataAnswer::Accepted)
            .await
            .map_err(|e| refuse(Some(binding.id), DataAnswer::Accepted, e.to_string()))?;
        debug!(migration = %binding.id.short(), index = binding.index, "data connection bound");
        // The migration may have ended meanwhile: then the connection just closes.
        let stream = DataStream::new(tokio_rustls::TlsStream::Server(tls), self.cut_token(&peer));
        let _ = deliver.try_send((binding.index, stream));
        Ok(())
    }

    /// Checks a binding against the table and claims its index.
    fn claim(
        &self,
        peer: &NodeId,
        b: &DataBinding,
    ) -> Result<mpsc::Sender<(u32, DataStream)>, DataAnswer> {
        let table = lock(&self.table);
        let e = table
            .get(&b.id)
            .filter(|e| e.offer == b.offer)
            .ok_or(DataAnswer::UnknownMigration)?;
        if &e.source != peer {
            return Err(DataAnswer::NotTheSource);
        }
        if b.index >= e.connections || b.index >= 64 {
            return Err(DataAnswer::BeyondAgreed);
        }
        let bit = 1u64 << b.index;
        if e.claims.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(DataAnswer::AlreadyOpen);
        }
        Ok(e.deliver.clone())
    }

    /// The token a new connection with `peer` is severed by.
    fn cut_token(&self, peer: &NodeId) -> CancellationToken {
        let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
        cuts.entry(*peer).or_default().child_token()
    }

    /// Severs every data connection with `peer`, as a network fault would: reads and writes
    /// on them fail from now on. Connections made later are not affected.
    pub fn cut(&self, peer: &NodeId) {
        let token = self
            .cuts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
        if let Some(t) = token {
            t.cancel();
        }
    }

    fn client(&self, target: NodeId) -> Result<Arc<ClientConfig>, ConnectError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&target) {
            return Ok(c.clone());
        }
        // Bounded: one entry per roster member this node ever sent a VM to.
        if clients.len() >= 4096 {
            clients.clear();
        }
        let c = tls::client_config(&self.key, target)
            .map_err(|e| ConnectError::Setup(e.to_string()))?;
        clients.insert(target, c.clone());
        Ok(c)
    }

    /// Opens data connection `index` of migration `id` (offer hash `offer`) to `target` at
    /// `endpoint` (or, failing its addresses, at one of `via` on the endpoint's port).
    pub async fn connect(
        &self,
        target: NodeId,
        endpoint: &DataEndpoint,
        via: &[IpAddr],
        id: MigrationId,
        offer: Hash,
        index: u32,
    ) -> Result<DataStream, ConnectError> {
        let mut candidates: Vec<SocketAddr> = endpoint
            .addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        candidates.extend(via.iter().map(|ip| SocketAddr::new(*ip, endpoint.port)));
        candidates.dedup();
        let mut last = ConnectError::NoAddress;
        for addr in candidates {
            let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    last = ConnectError::Unreachable {
                        addr,
                        error: e.to_string(),
                    };
                    continue;
                }
                Err(_) => {
                    last = ConnectError::Unreachable {
                        addr,
                        error: "timed out".into(),
                    };
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            return self.handshake(tcp, addr, target, id, offer, index).await;
        }
        Err(last)
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        target: NodeId,
        id: MigrationId,
        offer: Hash,
        index: u32,
    ) -> Result<DataStream, ConnectError> {
        let connector = TlsConnector::from(self.client(target)?);
        let connect = connector.connect(tls::server_name(), tcp);
        let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                // A key mismatch is someone in the way: worth an audit record.
                self.state.audit(AuditEvent::Refused {
                    id: Some(id),
                    peer: Some(target),
                    reason: format!("data connection to {addr} refused: tls ({e})"),
                });
                return Err(ConnectError::Tls {
                    addr,
                    error: e.to_string(),
                });
            }
            Err(_) => {
                return Err(ConnectError::Tls {
                    addr,
                    error: "handshake timed out".into(),
                })
            }
        };
        let exporter = tls
            .get_ref()
            .1
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
            .map_err(|e| ConnectError::Tls {
                addr,
                error: e.to_string(),
            })?;
        let binding = Signed::sign(
            &DataBinding {
                id,
                offer,
                index,
                exporter,
            },
            &self.key,
        );
        let answered = async {
            write_typed(&mut tls, &binding).await?;
            read_typed::<_, DataAnswer>(&mut tls, MAX_ANSWER_FRAME).await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, answered).await {
            Ok(Ok(DataAnswer::Accepted)) => Ok(DataStream::new(
                tokio_rustls::TlsStream::Client(tls),
                self.cut_token(&target),
            )),
            Ok(Ok(refused)) => Err(ConnectError::Refused(refused.label())),
            Ok(Err(e)) => Err(ConnectError::Binding(e)),
            Err(_) => Err(ConnectError::Binding(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer to the binding",
            ))),
        }
    }

    /// Opens connections `0..n` at once.
    pub async fn connect_all(
        &self,
        target: NodeId,
        endpoint: &DataEndpoint,
        via: &[IpAddr],
        id: MigrationId,
        offer: Hash,
        n: u32,
    ) -> Result<Vec<DataStream>, ConnectError> {
        futures::future::try_join_all(
            (0..n).map(|i| self.connect(target, endpoint, via, id, offer, i)),
        )
        .await
    }
}

/// A refused incoming connection, for the audit log.
#[derive(Debug)]
struct Refusal {
    id: Option<MigrationId>,
    peer: Option<NodeId>,
    label: &'static str,
    detail: String,
}

/// A short description of a data connection's cipher, e.g. `TLS1.3 AES_256_GCM_SHA384`.
pub fn describe(stream: &DataStream) -> String {
    let (version, suite) = match &stream.tls {
        tokio_rustls::TlsStream::Client(s) => {
            let c = s.get_ref().1;
            (c.protocol_version(), c.negotiated_cipher_suite())
        }
        tokio_rustls::TlsStream::Server(s) => {
            let c = s.get_ref().1;
            (c.protocol_version(), c.negotiated_cipher_suite())
        }
    };
    let version = match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS1.3".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS?".into(),
    };
    let suite = suite.map_or("?".to_string(), |s| {
        format!("{:?}", s.suite())
            .trim_start_matches("TLS13_")
            .to_string()
    });
    format!("{version} {suite}")
}
