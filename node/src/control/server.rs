//! The admin API server.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drift_protocol::codec::FrameDecoder;
use drift_protocol::roster::Endorsed;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{
    CreateVm, DecisionsView, ErrorView, MigrationsView, PeersView, RosterPushView, StartMigration,
    StatusView, TableView, VerifyView, VmsView, API_VERSION,
};
use crate::autopilot::DecisionLog;
use crate::hypervisor::HypervisorError;
use crate::mesh::{Client, MAX_GOSSIP_MESSAGE};
use crate::migration::service::{MigrateError, Migrations};
use crate::state::NodeState;

#[derive(Clone)]
struct App {
    state: Arc<NodeState>,
    mesh: Client,
    migrations: Arc<Migrations>,
    decisions: Arc<DecisionLog>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorView {
            error: message.into(),
        }),
    )
        .into_response()
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another drift daemon is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot create the admin socket {path}: {cause}")]
    Bind {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot listen for metrics on {addr} ([control] metrics_listen): {cause}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// Binds the socket (mode 0600; a stale socket file is replaced, a live one is an error) and
/// serves until `cancel`, then removes the socket file.
pub async fn bind(
    path: &Path,
    state: Arc<NodeState>,
    mesh: Client,
    migrations: Arc<Migrations>,
    decisions: Arc<DecisionLog>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_owned(),
        cause: source,
    };
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;

    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/table", get(table))
        .route("/v1/roster", post(push_roster))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{vm}/verify", post(verify_vm))
        .route("/v1/vms/{vm}", axum::routing::delete(destroy_vm))
        .layer(DefaultBodyLimit::max(MAX_GOSSIP_MESSAGE))
        .route("/v1/migrations", get(list_migrations).post(start_migration))
        .route("/v1/migrations/{id}/cancel", post(cancel_migration))
        .route("/v1/decisions", get(list_decisions))
        .route("/v1/audit/witnessed", get(witnessed))
        .route("/metrics", get(metrics))
        .with_state(App {
            state,
            mesh,
            migrations,
            decisions,
        });
    let path = path.to_owned();
    Ok(tokio::spawn(async move {
        let shutdown = cancel.clone().cancelled_owned();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "admin API stopped");
        }
        let _ = std::fs::remove_file(&path);
    }))
}

/// `GET /v1/audit/witnessed`: the audit heads of peers this node countersigned, and the
/// conflicts it saw, as one codec frame (`drift_protocol::witness::WitnessBook`): signed
/// objects, checked by whoever reads them.
async fn witnessed(State(app): State<App>) -> Response {
    let book = app.state.witness_book().clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        drift_protocol::codec::encode_frame(&book),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    metrics_response(&app.state, &app.mesh).await
}

/// `GET /metrics`: the Prometheus text exposition (OpenMetrics) of [`crate::metrics`].
async fn metrics_response(state: &NodeState, mesh: &Client) -> Response {
    let peers = mesh.peers().await.map(|p| p.len()).unwrap_or(0);
    let text =
        mesh.with_registry(|libp2p| crate::metrics::render(state, &state.metrics, libp2p, peers));
    match text {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics did not encode"),
    }
}

/// Serves `GET /metrics` alone on a TCP address (`[control] metrics_listen`), for a
/// Prometheus server that cannot reach the admin socket. Nothing else is served there.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    state: Arc<NodeState>,
    mesh: Client,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::MetricsBind {
            addr,
            cause: source,
        })?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let (state, mesh) = (state.clone(), mesh.clone());
            async move { metrics_response(&state, &mesh).await }
        }),
    );
    tracing::info!(%addr, "metrics listening");
    Ok(tokio::spawn(async move {
        let shutdown = cancel.cancelled_owned();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    }))
}

async fn status(State(app): State<App>) -> Response {
    let peers = match app.mesh.peers().await {
        Ok(p) => p.len(),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let listen = app
        .mesh
        .listen_addrs()
        .await
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    let s = &app.state;
    let c = &s.counters;
    let hosts = s.hosts_by_liveness();
    let roster = s.roster();
    let (admission, incoming_streams) = app.migrations.admission_view();
    Json(StatusView {
        version: API_VERSION,
        node: s.me,
        name: roster.roster.member(&s.me).map(|m| m.name.clone()),
        cluster: roster.roster.cluster.clone(),
        roster_epoch: roster.roster.epoch,
        uptime_ms: s.started.elapsed().as_millis() as u64,
        listen,
        peers,
        hosts,
        insecure_open: s.insecure_open,
        reports_accepted: c.reports_accepted.load(Ordering::Relaxed),
        reports_published: c.reports_published.load(Ordering::Relaxed),
        publish_failures: c.publish_failures.load(Ordering::Relaxed),
        reports_rejected: c.rejections(),
        connections_denied: c.connections_denied.load(Ordering::Relaxed),
        rosters_adopted: c.rosters_adopted.load(Ordering::Relaxed),
        rosters_refused: c.rosters_refused.load(Ordering::Relaxed),
        admission,
        incoming_streams,
        clock_off: *s.clock_off.lock().unwrap_or_else(|p| p.into_inner()),
    })
    .into_response()
}

async fn peers(State(app): State<App>) -> Response {
    match app.mesh.peers().await {
        Ok(peers) => Json(PeersView {
            version: API_VERSION,
            peers,
        })
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn table(State(app): State<App>) -> Response {
    let s = &app.state;
    let roster = s.roster();
    let rows = s.table().rows(&roster.roster, &s.me, Instant::now());
    Json(TableView {
        version: API_VERSION,
        node: s.me,
        roster_epoch: roster.roster.epoch,
        rows,
    })
    .into_response()
}

async fn push_roster(State(app): State<App>, body: Bytes) -> Response {
    let signed = match Endorsed::decode_frame(&FrameDecoder::new(MAX_GOSSIP_MESSAGE), &body) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a signed roster: {e}")),
    };
    let result = app.state.adopt(&[signed], crate::clock::now());
    match result {
        Ok(Some(change)) => {
            let epoch = change.epoch;
            if app.mesh.roster_changed(change).await.is_err() {
                return error(StatusCode::SERVICE_UNAVAILABLE, "mesh stopped");
            }
            Json(RosterPushView {
                version: API_VERSION,
                adopted: true,
                epoch,
            })
            .into_response()
        }
        Ok(None) => Json(RosterPushView {
            version: API_VERSION,
            adopted: false,
            epoch: app.state.roster().roster.epoch,
        })
        .into_response(),
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("roster refused: {e}"),
        ),
    }
}

fn vm_error(e: HypervisorError) -> Response {
    let status = match e {
        HypervisorError::NoSuchVm(_) => StatusCode::NOT_FOUND,
        HypervisorError::NameTaken(_) => StatusCode::CONFLICT,
        HypervisorError::Invalid(_) | HypervisorError::TooMany => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

async fn list_vms(State(app): State<App>) -> Response {
    let host = {
        let roster = app.state.roster();
        roster
            .roster
            .member(&app.state.me)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| app.state.me.short())
    };
    Json(VmsView {
        version: API_VERSION,
        host,
        vms: app.state.vms.list().await,
    })
    .into_response()
}

async fn create_vm(State(app): State<App>, body: Bytes) -> Response {
    let req: CreateVm = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad VM request: {e}")),
    };
    let spec = match req.to_spec() {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    match app.state.vms.create(spec).await {
        Ok(vm) => Json(vm).into_response(),
        Err(e) => vm_error(e),
    }
}

async fn verify_vm(
    State(app): State<App>,
    axum::extract::Path(vm): axum::extract::Path<String>,
) -> Response {
    match app.state.vms.verify(&vm).await {
        Ok(report) => Json(VerifyView {
            version: API_VERSION,
            report,
        })
        .into_response(),
        Err(e) => vm_error(e),
    }
}

async fn destroy_vm(
    State(app): State<App>,
    axum::extract::Path(vm): axum::extract::Path<String>,
) -> Response {
    match app.state.vms.destroy(&vm).await {
        Ok(()) => {
            Json(serde_json::json!({ "version": API_VERSION, "destroyed": vm })).into_response()
        }
        Err(e) => vm_error(e),
    }
}

async fn list_migrations(State(app): State<App>) -> Response {
    Json(MigrationsView {
        version: API_VERSION,
        migrations: app.migrations.list(),
    })
    .into_response()
}

async fn start_migration(State(app): State<App>, body: Bytes) -> Response {
    let req: StartMigration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad migration request: {e}"),
            )
        }
    };
    let params = req.params(app.migrations.default_limits());
    match app.migrations.migrate(&req.vm, &req.to, params).await {
        Ok(id) => Json(serde_json::json!({ "version": API_VERSION, "id": id })).into_response(),
        Err(e) => {
            let status = match e {
                MigrateError::Vm(HypervisorError::NoSuchVm(_)) | MigrateError::NoSuchNode(_) => {
                    StatusCode::NOT_FOUND
                }
                MigrateError::Refused(_) | MigrateError::Busy(_) => StatusCode::CONFLICT,
                MigrateError::ToSelf | MigrateError::Unsupported(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::BAD_GATEWAY,
            };
            error(status, e.to_string())
        }
    }
}

async fn cancel_migration(
    State(app): State<App>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = id.parse::<drift_protocol::MigrationId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a migration id"),
        );
    };
    if app.migrations.cancel(&id) {
        Json(serde_json::json!({ "version": API_VERSION, "cancelling": id })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("no migration {id} is being sent from this node"),
        )
    }
}

async fn list_decisions(State(app): State<App>) -> Response {
    Json(DecisionsView {
        version: API_VERSION,
        node: app.state.me,
        enabled: app.decisions.enabled(),
        dry_run: app.decisions.dry_run(),
        upper_permille: app.decisions.upper_permille(),
        decisions: app.decisions.snapshot(),
    })
    .into_response()
}
