//! A QMP (QEMU Machine Protocol) client: how drift drives a QEMU process.
//!
//! QMP is newline-delimited JSON over a Unix socket. QEMU greets, the client negotiates
//! capabilities, then sends commands, each tagged with an `id` that QEMU echoes in its answer
//! (`return` or `error`). Events arrive at any time, between answers:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant D as drift (Qmp)
//!     participant Q as QEMU
//!     Q->>D: {"QMP": {"version": ..., "capabilities": [...]}}
//!     D->>Q: {"execute": "qmp_capabilities", "id": 0}
//!     Q->>D: {"return": {}, "id": 0}
//!     D->>Q: {"execute": "query-status", "id": 1}
//!     Q-->>D: {"event": "STOP", "data": {}, "timestamp": {...}}
//!     Q->>D: {"return": {"running": false, "status": "paused"}, "id": 1}
//! ```
//!
//! One reader task owns the read half: it routes answers by id to the waiting caller (at most
//! [`MAX_IN_FLIGHT`] at once) and events to a bounded broadcast channel. One writer task owns
//! the write half, so a caller that times out never leaves half a command on the socket. Lines
//! over [`MAX_LINE`] bytes close the connection; malformed lines are logged and skipped. When
//! the socket closes every waiting and later call fails with [`QmpError::Closed`]; dropping the
//! [`Qmp`] ends both tasks.
//!
//! drift speaks QMP over `serde_json::Value` rather than through the `qapi` crate: it needs a
//! handful of commands and events, not types generated from QEMU's whole schema and the codec
//! stack that comes with them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

/// Longest line accepted from QEMU, newline included.
pub const MAX_LINE: usize = 1024 * 1024;
/// At most this many commands wait for their answers at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Events buffered per subscriber; a slower subscriber loses the oldest.
pub const EVENT_BUFFER: usize = 256;
/// How long the typed wrappers ([`Qmp::query_status`], [`Qmp::stop`], ...) wait for QEMU.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// A read buffer grown past this by a long line is released afterwards.
const KEEP_BUFFER: usize = 64 * 1024;

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {what}")]
    Timeout { what: String },
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP {MAX_IN_FLIGHT} commands already in flight")]
    Busy,
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QEMU refused: {class}: {desc}")]
    Command { class: String, desc: String },
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    /// `null` when the event carries no data.
    pub data: Value,
    /// When QEMU emitted it, microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

/// The answer to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmStatus {
    pub running: bool,
    /// QEMU's run state: "running", "paused", "inmigrate", "postmigrate", "prelaunch", ...
    pub status: String,
}

/// The answer to `query-migrate`; absent fields are `None` or 0.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationInfo {
    /// "setup", "active", "postcopy-active", "completed", "failed", "cancelled", ...
    pub status: Option<String>,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    pub ram_total: u64,
    pub ram_mbps: f64,
    pub dirty_sync_count: u64,
    pub dirty_pages_rate: u64,
    pub postcopy_requests: u64,
    pub multifd_bytes: u64,
    /// The auto-converge throttle QEMU applies to the guest, percent.
    pub cpu_throttle_pct: u64,
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    fn parse(v: &Value) -> Self {
        let ram = &v["ram"];
        let u = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64);
        let s = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
        Self {
            status: s("status"),
            total_time_ms: u(v, "total-time"),
            downtime_ms: u(v, "downtime"),
            expected_downtime_ms: u(v, "expected-downtime"),
            setup_time_ms: u(v, "setup-time"),
            ram_transferred: u(ram, "transferred").unwrap_or(0),
            ram_remaining: u(ram, "remaining").unwrap_or(0),
            ram_total: u(ram, "total").unwrap_or(0),
            ram_mbps: ram.get("mbps").and_then(Value::as_f64).unwrap_or(0.0),
            dirty_sync_count: u(ram, "dirty-sync-count").unwrap_or(0),
            dirty_pages_rate: u(ram, "dirty-pages-rate").unwrap_or(0),
            postcopy_requests: u(ram, "postcopy-requests").unwrap_or(0),
            multifd_bytes: u(ram, "multifd-bytes").unwrap_or(0),
            cpu_throttle_pct: u(v, "cpu-throttle-percentage").unwrap_or(0),
            error_desc: s("error-desc"),
        }
    }
}

type Reply = Result<Value, QmpError>;

/// What the reader and writer tasks share with the handle.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct State {
    open: bool,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// Dropped on close, which tells every subscriber.
    events: Option<broadcast::Sender<QmpEvent>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every waiting caller with `Closed`, and every later one.
    fn close(&self) {
        let mut state = self.state();
        state.open = false;
        state.pending.clear();
        state.events = None;
    }

    fn route(&self, line: &[u8]) {
        match parse_message(line) {
            Ok(Message::Reply { id, reply }) => match self.state().pending.remove(&id) {
                Some(tx) => {
                    let _ = tx.send(reply);
                }
                None => debug!(id, "QMP answer nobody waits for any more"),
            },
            Ok(Message::Event(event)) => {
                if let Some(tx) = &self.state().events {
                    // No subscriber is fine: nobody waits for this event.
                    let _ = tx.send(event);
                }
            }
            Ok(Message::Ignored) => {}
            Err(e) => warn!(error = %e, "skipping malformed QMP message"),
        }
    }
}

/// Removes a command's pending entry however its caller ends (answer, timeout, cancellation).
struct Deregister<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Deregister<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}

/// One connection to one QEMU's QMP socket; share it through an `Arc`.
#[derive(Debug)]
pub struct Qmp {
    shared: Arc<Shared>,
    lines: mpsc::Sender<Vec<u8>>,
    tasks: [AbortHandle; 2],
    /// QEMU offered out-of-band execution and it is on: `exec-oob` commands run on the
    /// monitor's own thread, even while the main loop is blocked (a post-copy target waiting
    /// on a page that cannot come).
    oob: bool,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `path`, checks the greeting and negotiates
    /// capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let greeted = async {
            let (read, write) = UnixStream::connect(path).await?.into_split();
            let mut read = BufReader::new(read);
            let mut line = Vec::new();
            if !read_line(&mut read, &mut line).await? {
                return Err(QmpError::Closed);
            }
            let greeting: Value = serde_json::from_slice(&line)
                .map_err(|e| QmpError::Protocol(format!("greeting is not JSON: {e}")))?;
            let Some(qmp) = greeting.get("QMP").filter(|q| q.is_object()) else {
                return Err(QmpError::Protocol("greeting lacks \"QMP\"".into()));
            };
            let v = &qmp["version"]["qemu"];
            debug!(major = %v["major"], minor = %v["minor"], micro = %v["micro"], "QMP greeting");
            let oob = qmp["capabilities"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "oob"));
            Ok(Qmp::start(read, write, oob))
        };
        let qmp = tokio::time::timeout_at(deadline, greeted)
            .await
            .map_err(|_| QmpError::Timeout {
                what: "QMP greeting".into(),
            })??;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let enable = qmp.oob.then(|| json!({ "enable": ["oob"] }));
        qmp.execute("qmp_capabilities", enable, left).await?;
        Ok(qmp)
    }

    fn start(read: BufReader<OwnedReadHalf>, write: OwnedWriteHalf, oob: bool) -> Qmp {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open: true,
                pending: HashMap::new(),
                events: Some(events),
            }),
            next_id: AtomicU64::new(0),
        });
        let (lines, rx) = mpsc::channel(MAX_IN_FLIGHT);
        let reader = tokio::spawn(read_loop(read, shared.clone()));
        let writer = tokio::spawn(write_loop(write, rx, shared.clone()));
        Qmp {
            shared,
            lines,
            tasks: [reader.abort_handle(), writer.abort_handle()],
            oob,
        }
    }

    /// Runs `command` and returns its `return` value, waiting at most `timeout`.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send("execute", command, arguments, timeout).await
    }

    /// Runs `command` out of band where QEMU offers it (only commands QEMU allows out of
    /// band, such as `migrate-recover`), else in band as [`Qmp::execute`].
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let kind = if self.oob { "exec-oob" } else { "execute" };
        self.send(kind, command, arguments, timeout).await
    }

    async fn send(
        &self,
        kind: &str,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ kind: command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line =
            serde_json::to_vec(&message).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.state();
            if !state.open {
                return Err(QmpError::Closed);
            }
            if state.pending.len() >= MAX_IN_FLIGHT {
                return Err(QmpError::Busy);
            }
            state.pending.insert(id, tx);
        }
        let _deregister = Deregister {
            shared: &self.shared,
            id,
        };
        let exchange = async {
            self.lines.send(line).await.map_err(|_| QmpError::Closed)?;
            rx.await.map_err(|_| QmpError::Closed)?
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| QmpError::Timeout {
                what: command.to_string(),
            })?
    }

    /// Whether the connection is gone (every call would fail with [`QmpError::Closed`]).
    pub fn is_closed(&self) -> bool {
        !self.shared.state().open
    }

    /// Subscribes to the events QEMU emits from now on. A subscriber that falls more than
    /// [`EVENT_BUFFER`] events behind loses the oldest and is told how many (`Lagged`).
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.shared.state().events {
            Some(tx) => tx.subscribe(),
            // Closed: a receiver that reports it at once.
            None => broadcast::channel(1).1,
        }
    }

    /// Waits at most `timeout` for the next event called `name` that satisfies `pred`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        pred: impl Fn(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(event) if event.name == name && pred(&event) => return Ok(event),
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        warn!(missed, waiting_for = name, "QMP events lost")
                    }
                    Err(RecvError::Closed) => return Err(QmpError::Closed),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("event {name}"),
            })?
    }

    /// `query-status`: whether the guest runs.
    pub async fn query_status(&self) -> Result<VmStatus, QmpError> {
        let v = self.execute("query-status", None, COMMAND_TIMEOUT).await?;
        serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("query-status: {e}")))
    }

    /// `query-migrate`: the progress of the current (or last) migration.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None, COMMAND_TIMEOUT).await?;
        Ok(MigrationInfo::parse(&v))
    }

    /// `migrate-set-capabilities` with `(name, on)` pairs, e.g. `("postcopy-ram", true)`.
    pub async fn set_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(name, on)| json!({ "capability": name, "state": on }))
            .collect();
        let args = json!({ "capabilities": caps });
        self.run("migrate-set-capabilities", Some(args)).await
    }

    /// `migrate-set-parameters`, e.g. `{"downtime-limit": 300}`.
    pub async fn set_parameters(&self, params: Value) -> Result<(), QmpError> {
        self.run("migrate-set-parameters", Some(params)).await
    }

    /// Pauses the guest (QEMU then emits `STOP`).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.run("stop", None).await
    }

    /// Resumes the guest (QEMU then emits `RESUME`).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.run("cont", None).await
    }

    /// Ends QEMU. The connection closing before the answer arrives counts as done.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.run("quit", None).await {
            Err(QmpError::Closed) => Ok(()),
            other => other,
        }
    }

    async fn run(&self, command: &str, arguments: Option<Value>) -> Result<(), QmpError> {
        self.execute(command, arguments, COMMAND_TIMEOUT)
            .await
            .map(drop)
    }
}

async fn read_loop(mut read: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut read, &mut line).await {
            Ok(true) => shared.route(&line),
            Ok(false) => {
                debug!("QEMU closed the QMP socket");
                break;
            }
            Err(e) => {
                // QEMU quitting resets the socket: expected on destroy, and a crash shows as a lost VM.
                debug!(error = %e, "closing the QMP connection");
                break;
            }
        }
        if line.capacity() > KEEP_BUFFER {
            line = Vec::new();
        }
    }
    shared.close();
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut lines: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = lines.recv().await {
        if let Err(e) = write.write_all(&line).await {
            warn!(error = %e, "writing to the QMP socket failed");
            shared.close();
            return;
        }
    }
}

/// Reads one line (newline included) into `line`: `Ok(false)` at the end of the stream (a
/// partial last line is dropped), an error for a line over [`MAX_LINE`] bytes. `line` never
/// holds more than [`MAX_LINE`] bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    read: &mut R,
    line: &mut Vec<u8>,
) -> Result<bool, QmpError> {
    line.clear();
    loop {
        let chunk = read.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(false);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let needed = line.len() + take;
        if needed > MAX_LINE {
            return Err(QmpError::Protocol(format!("line over {MAX_LINE} bytes")));
        }
        if needed > line.capacity() {
            let target = needed.max(line.capacity() * 2).min(MAX_LINE);
            line.reserve_exact(target - line.len());
        }
        line.extend_from_slice(&chunk[..take]);
        read.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// One line from QEMU.
#[derive(Debug)]
enum Message {
    Reply {
        id: u64,
        reply: Reply,
    },
    Event(QmpEvent),
    /// Blank lines and repeated greetings.
    Ignored,
}

fn parse_message(line: &[u8]) -> Result<Message, String> {
    if line.trim_ascii().is_empty() {
        return Ok(Message::Ignored);
    }
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("not a JSON object".into());
    };
    if let Some(name) = obj.get("event") {
        let name = name.as_str().ok_or("event name is not a string")?;
        let ts = &v["timestamp"];
        let seconds = ts["seconds"].as_u64().unwrap_or(0);
        let micros = ts["microseconds"].as_u64().unwrap_or(0);
        return Ok(Message::Event(QmpEvent {
            name: name.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: seconds.saturating_mul(1_000_000).saturating_add(micros),
        }));
    }
    if obj.contains_key("QMP") {
        return Ok(Message::Ignored);
    }
    let id = obj.get("id").and_then(Value::as_u64);
    let reply = if let Some(ret) = obj.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = obj.get("error") {
        let text = |key: &str| err[key].as_str().unwrap_or("?").to_string();
        Err(QmpError::Command {
            class: text("class"),
            desc: text("desc"),
        })
    } else {
        return Err("neither an answer nor an event".into());
    };
    let id = id.ok_or("answer without a numeric id")?;
    Ok(Message::Reply { id, reply })
}

#[cfg(test)]
mod tests;
