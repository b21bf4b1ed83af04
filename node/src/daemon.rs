//! `drift run`: starts every part of a node in order and stops them in reverse.
//!
//! Start: key → state directory → roster (the newer of the configured file and the last
//! adopted one, both verified against the admin key) → peer table → mesh → data plane →
//! migrations → monitor → balancing autopilot (unless `balance.enabled = false`) → admin API.
//! Stop (SIGINT/SIGTERM or [`Running::shutdown`]): one cancellation token stops every task;
//! the node waits for each, then removes its socket. Every file it writes is written atomically,
//! so stopping at any point leaves nothing half-written.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use drift_protocol::codec::{FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::report::Freshness;
use drift_protocol::roster::{self, Admins, Announcement, Endorsed, RosterError};
use drift_protocol::{AuditEvent, Timestamp};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::audit::AuditLog;
use crate::autopilot::{Autopilot, DecisionLog};
use crate::config::Config;
use crate::identity::{read_key, read_signed_roster, FileError};
use crate::mesh::{self, Client, MeshConfig, MeshError};
use crate::monitor::{self, Monitor};
use crate::state::{LoadedRoster, NodeState, ADOPTED_CHAIN, ADOPTED_ROSTER};
use crate::table::Table;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot create state directory {path}: {cause}")]
    StateDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot open {path} in the state directory: {cause}")]
    StateFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot find this program's own path (needed to start VMMs): {cause}")]
    OwnPath { cause: std::io::Error },
    #[error("roster {path} is not acceptable: {cause}")]
    Roster { path: PathBuf, cause: RosterError },
    #[error(
        "this node ({id}) is not a member of roster epoch {epoch}; add it with `drift roster add` \
         and sign a new epoch (or set node.insecure_open for experiments)"
    )]
    NotAMember { id: String, epoch: u64 },
    #[error("{0}")]
    Monitor(String),
    // Not `#[from]`: a source would be printed a second time after the hint.
    #[error("{0}; move the audit log aside to start a new one")]
    Audit(crate::audit::AuditError),
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error(transparent)]
    Api(#[from] crate::control::server::ServeError),
    #[error("another drift node is running on state directory {0}")]
    Locked(PathBuf),
    #[error(transparent)]
    Migrations(#[from] crate::migration::service::ServiceError),
    #[error(transparent)]
    Data(#[from] crate::dataplane::DataPlaneError),
}

impl From<crate::audit::AuditError> for StartError {
    fn from(e: crate::audit::AuditError) -> Self {
        StartError::Audit(e)
    }
}

/// A started node.
#[derive(Debug)]
pub struct Running {
    /// Held for the node's lifetime: one node per state directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
    pub state: Arc<NodeState>,
    pub mesh: Client,
    pub socket: PathBuf,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops every task and waits for them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
        info!("node stopped");
    }

    /// A token that is cancelled when the node stops.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

fn load_roster(config: &Config) -> Result<LoadedRoster, StartError> {
    let trust = config.node.trust();
    let now = crate::clock::now();
    let path = &config.node.roster;
    let signed = read_signed_roster(path)?;
    let r = roster::verify(&signed, &trust, Some(now)).map_err(|source| StartError::Roster {
        path: path.clone(),
        cause: source,
    })?;
    let configured = LoadedRoster {
        chain: vec![signed.clone()],
        signed,
        roster: r,
    };
    let dir = &config.node.state_dir;
    let (saved_path, saved) = if dir.join(ADOPTED_CHAIN).exists() {
        let p = dir.join(ADOPTED_CHAIN);
        let saved = std::fs::read(&p).ok().and_then(|b| {
            Announcement::decode_frame(&FrameDecoder::new(MAX_FRAME_LEN), &b)
                .ok()
                .map(|a| a.chain)
        });
        (p, saved)
    } else if dir.join(ADOPTED_ROSTER).exists() {
        let p = dir.join(ADOPTED_ROSTER);
        let saved = read_signed_roster(&p).ok().map(|e| vec![e]);
        (p, saved)
    } else {
        return Ok(configured);
    };
    match saved.map(|chain| adopted_before(&configured, &chain, &trust, now)) {
        Some(Ok(Some(adopted))) => {
            info!(
                epoch = adopted.roster.epoch,
                "using the roster adopted before restart"
            );
            Ok(adopted)
        }
        Some(Ok(None)) => Ok(configured),
        Some(Err(e)) => {
            warn!(path = %saved_path.display(), error = %e, "ignoring unusable adopted roster");
            Ok(configured)
        }
        None => {
            warn!(path = %saved_path.display(), "ignoring unreadable adopted roster");
            Ok(configured)
        }
    }
}

/// The newest epoch of `saved` (the epochs this node adopted before a restart) that the
/// configured roster leads to: walked forward epoch by epoch, each checked against the admins
/// of the one before; or, when the configured roster is older than every saved epoch, from the
/// first saved epoch newer than it, verified against the trust anchor as a loaded roster is.
/// `None`: nothing saved is newer.
fn adopted_before(
    configured: &LoadedRoster,
    saved: &[Endorsed],
    trust: &Admins,
    now: Timestamp,
) -> Result<Option<LoadedRoster>, roster::RosterError> {
    let newer: Vec<Endorsed> = saved
        .iter()
        .filter(|e| {
            e.signed
                .decode_unverified()
                .is_ok_and(|r| r.epoch > configured.roster.epoch)
        })
        .cloned()
        .collect();
    let Some(first) = newer.first() else {
        return Ok(None);
    };
    let (start, start_roster, rest) =
        match roster::advance(&configured.signed, &configured.roster, &newer, trust, now) {
            Ok(walked) if !walked.is_empty() => {
                (configured.signed.clone(), configured.roster.clone(), walked)
            }
            _ => {
                let r = roster::verify(first, trust, Some(now))?;
                if r.cluster != configured.roster.cluster {
                    return Err(roster::RosterError::WrongCluster {
                        expected: configured.roster.cluster.clone(),
                        got: r.cluster,
                    });
                }
                let walked = roster::advance(first, &r, &newer[1..], trust, now)?;
                (first.clone(), r, walked)
            }
        };
    let mut chain = vec![start.clone()];
    chain.extend(rest.iter().map(|(e, _)| e.clone()));
    let excess = chain.len().saturating_sub(roster::MAX_ANNOUNCED_EPOCHS);
    chain.drain(..excess);
    let (signed, roster) = rest.last().cloned().unwrap_or((start, start_roster));
    Ok(Some(LoadedRoster {
        signed,
        roster,
        chain,
    }))
}

/// Starts a node from its configuration.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let key = read_key(&config.node.key)?;
    let me = key.public();
    let span = tracing::info_span!("node", id = %me.short());
    let state_dir = config.node.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .and_then(|()| std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| StartError::StateDir {
            path: state_dir.clone(),
            cause: source,
        })?;
    // One node per state directory, checked before anything in it is touched.
    let lock_path = state_dir.join("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| StartError::StateFile {
            path: lock_path.clone(),
            cause: source,
        })?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| StartError::Locked(state_dir.clone()))?;
    let loaded = load_roster(&config)?;
    let roster = &loaded.roster;
    if roster.member(&me).is_none() && !config.node.insecure_open {
        return Err(StartError::NotAMember {
            id: me.to_string(),
            epoch: roster.epoch,
        });
    }
    let _enter = span.enter();
    if config.node.insecure_open {
        warn!("INSECURE: node.insecure_open is set: connections from ANY peer are accepted; use only for experiments");
    }
    let name = roster.member(&me).map(|m| m.name.clone());
    let epoch = roster.epoch;
    let members = roster.members.len();
    let table = Table::new(config.gossip.suspect_after, config.gossip.gone_after);
    let audit = AuditLog::open(&state_dir, key.clone())?;
    let exe = std::env::current_exe().map_err(|cause| StartError::OwnPath { cause })?;
    let vms = crate::hypervisor::Vms::new(state_dir.join("vms"), exe);
    vms.scan();
    let roster_hash = loaded.signed.hash();
    let state = Arc::new(NodeState::new(me, &config.node, loaded, table, audit, vms));
    state.audit(AuditEvent::NodeStarted {
        roster_epoch: epoch,
    });
    state.audit(AuditEvent::RosterAdopted {
        epoch,
        hash: roster_hash,
    });
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let (client, mesh_task) = mesh::spawn(
        MeshConfig {
            key: key.clone(),
            listen: config.node.listen.clone(),
            bootstrap: config.node.bootstrap.clone(),
            max_connections: config.node.max_connections,
            freshness: Freshness {
                max_age_ms: config.gossip.max_report_age.as_millis() as u64,
                max_skew_ms: config.gossip.max_clock_skew.as_millis() as u64,
            },
        },
        state.clone(),
        cancel.clone(),
    )?;
    tasks.spawn(
        async move {
            let _ = mesh_task.await;
        }
        .instrument(span.clone()),
    );

    let monitor = match Monitor::new(&config.load, &me) {
        Ok(m) => m,
        Err(e) => {
            cancel.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(StartError::Monitor(e));
        }
    };

    let data = if config.data.enabled {
        let data_config = crate::dataplane::DataConfig {
            listen: config.data.listen_addr(&config.node.listen),
            advertise: config.data.advertise.clone(),
            connections: config.data.connections(),
        };
        match crate::dataplane::DataPlane::start(
            data_config,
            key.clone(),
            state.clone(),
            cancel.clone(),
        )
        .await
        {
            Ok((plane, task)) => {
                tasks.spawn(
                    async move {
                        let _ = task.await;
                    }
                    .instrument(span.clone()),
                );
                Some(plane)
            }
            Err(e) => {
                cancel.cancel();
                while tasks.join_next().await.is_some() {}
                return Err(e.into());
            }
        }
    } else {
        info!("data plane off (data.enabled = false): migrations move on the mesh");
        None
    };

    let migrations = match crate::migration::service::Migrations::new(
        state.clone(),
        client.clone(),
        key.clone(),
        config.qemu.image_dirs.clone(),
        data,
        crate::migration::service::ServiceLimits {
            migration: config.migration.limits(),
            ..crate::migration::service::ServiceLimits::from_config(
                &config.admission,
                &config.balance.policy(),
            )
        },
        cancel.clone(),
    ) {
        Ok(m) => m,
        Err(e) => {
            cancel.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(e.into());
        }
    };
    // Target records settle before any resolve query is answered.
    migrations.recover().await;
    create_configured_vms(&state, &config.vm).await;
    let acceptor = migrations.spawn_acceptor(cancel.clone());
    tasks.spawn(
        async move {
            let _ = acceptor.await;
        }
        .instrument(span.clone()),
    );

    // The monitor reports the capacity reserved for incoming migrations.
    tasks.spawn(
        monitor::run(
            monitor,
            key.clone(),
            state.clone(),
            client.clone(),
            migrations.clone(),
            config.load.interval,
            cancel.clone(),
        )
        .instrument(span.clone()),
    );

    tasks.spawn(
        crate::witness::run(
            state.clone(),
            client.clone(),
            config.gossip.audit_head_interval,
            cancel.clone(),
        )
        .instrument(span.clone()),
    );

    let decisions = Arc::new(DecisionLog::new(&config.balance));
    if config.balance.enabled {
        let pilot = Autopilot::new(
            &config.balance,
            state.clone(),
            migrations.clone(),
            decisions.clone(),
        );
        tasks.spawn(pilot.run(cancel.clone()).instrument(span.clone()));
    } else {
        info!("balancing autopilot off (balance.enabled = false)");
    }

    let socket = config.socket_path();
    let api = crate::control::server::bind(
        &socket,
        state.clone(),
        client.clone(),
        migrations.clone(),
        decisions,
        cancel.clone(),
    )
    .await;
    let api = match api {
        Ok(api) => api,
        Err(e) => {
            cancel.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(e.into());
        }
    };
    tasks.spawn(
        async move {
            let _ = api.await;
        }
        .instrument(span.clone()),
    );
    if let Some(addr) = config.control.metrics_listen {
        let served = crate::control::server::serve_metrics(
            addr,
            state.clone(),
            client.clone(),
            cancel.clone(),
        )
        .await;
        match served {
            Ok(task) => {
                tasks.spawn(
                    async move {
                        let _ = task.await;
                    }
                    .instrument(span.clone()),
                );
            }
            Err(e) => {
                cancel.cancel();
                while tasks.join_next().await.is_some() {}
                return Err(e.into());
            }
        }
    }
    info!(
        name = name.as_deref().unwrap_or("-"),
        node = %me,
        roster_epoch = epoch,
        members,
        socket = %socket.display(),
        "drift node started"
    );
    drop(_enter);
    Ok(Running {
        _lock: lock,
        state,
        mesh: client,
        socket,
        cancel,
        tasks,
    })
}

/// Waits for SIGINT or SIGTERM.
pub async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// The names of the config's VMs already created on this state directory, one per line.
const CONFIGURED_VMS: &str = "config-vms";

/// Creates the config's `[[vm]]` entries that were never created on this state directory: a
/// configured VM that has since moved to another host is not started here again.
async fn create_configured_vms(state: &NodeState, vms: &[crate::control::CreateVm]) {
    if vms.is_empty() {
        return;
    }
    let ledger = state.state_dir.join(CONFIGURED_VMS);
    let mut created: std::collections::BTreeSet<String> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    for vm in vms {
        if created.contains(&vm.name) {
            continue;
        }
        if state.vms.find(&vm.name).is_err() {
            let spec = match vm.clone().to_spec() {
                Ok(spec) => spec,
                Err(e) => {
                    error!(error = %e, "configured VM not created");
                    continue;
                }
            };
            match state.vms.create(spec).await {
                Ok(v) => info!(vm = %v.name, backend = %v.backend, "configured VM created"),
                Err(e) => {
                    // Not recorded: the next start tries again.
                    error!(vm = %vm.name, error = %e, "configured VM not created");
                    continue;
                }
            }
        }
        created.insert(vm.name.clone());
        let text: String = created.iter().map(|n| format!("{n}\n")).collect();
        if let Err(e) = crate::durable::write_atomic(
            &ledger,
            text.as_bytes(),
            0o600,
            crate::durable::Overwrite::Replace,
        ) {
            error!(path = %ledger.display(), error = %e, "cannot record the configured VMs created");
        }
    }
}
