//! `drift audit show | verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use drift_protocol::{AuditEvent, NodeId};

use crate::audit::{read_head, read_log, verify_file, HEAD_FILE, LOG_FILE};
use crate::config::Config;
use crate::identity::read_key;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the records of an audit log.
    Show(ShowArgs),
    /// Check an audit log: signatures, hash chain, and the anchor; names the first bad record.
    Verify(VerifyArgs),
}

/// Which log to read.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// The node's config: its state directory's log, its key's id, its anchor.
    #[arg(long, short, conflicts_with = "file")]
    pub config: Option<PathBuf>,
    /// An audit log file.
    #[arg(long)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub which: LogArgs,
    /// Print JSON lines, one record each.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub which: LogArgs,
    /// The id of the node that signed the log (implied by --config).
    #[arg(long)]
    pub node: Option<NodeId>,
    /// The anchor file (default: audit.head next to the log).
    #[arg(long)]
    pub head: Option<PathBuf>,
}

fn log_path(which: &LogArgs) -> anyhow::Result<(PathBuf, Option<Config>)> {
    match (&which.config, &which.file) {
        (Some(c), _) => {
            let config = Config::load(c)?;
            Ok((config.node.state_dir.join(LOG_FILE), Some(config)))
        }
        (None, Some(l)) => Ok((l.clone(), None)),
        (None, None) => bail!("name the log with --config FILE or --file FILE"),
    }
}

fn describe(e: &AuditEvent) -> String {
    match e {
        AuditEvent::NodeStarted { roster_epoch } => {
            format!("node started (roster epoch {roster_epoch})")
        }
        AuditEvent::RosterAdopted { epoch, hash } => {
            format!("roster epoch {epoch} adopted ({})", hash.short())
        }
        AuditEvent::OfferSent {
            id,
            vm,
            target,
            mode,
            ..
        } => format!(
            "offer {} sent: vm {} to {} ({mode})",
            id.short(),
            vm.short(),
            target.short()
        ),
        AuditEvent::OfferReceived { id, vm, source, .. } => format!(
            "offer {} received: vm {} from {}",
            id.short(),
            vm.short(),
            source.short()
        ),
        AuditEvent::Decision {
            id,
            accepted,
            reason,
        } => {
            if *accepted {
                format!("offer {} accepted", id.short())
            } else {
                format!("offer {} refused: {reason}", id.short())
            }
        }
        AuditEvent::TransferStarted { id, side, peer } => format!(
            "transfer {} started as {side:?} with {}",
            id.short(),
            peer.short()
        ),
        AuditEvent::Switchover { id, side } => format!("switchover {} ({side:?})", id.short()),
        AuditEvent::Complete { id, side, root } => {
            format!("complete {} ({side:?}) root {}", id.short(), root.short())
        }
        AuditEvent::Commit { id, side, root } => {
            format!("commit {} ({side:?}) root {}", id.short(), root.short())
        }
        AuditEvent::Abort { id, side, reason } => {
            format!("abort {} ({side:?}): {reason}", id.short())
        }
        AuditEvent::Resolved { id, side, outcome } => {
            format!("resolved {} ({side:?}): {outcome}", id.short())
        }
        AuditEvent::Refused { id, peer, reason } => format!(
            "refused{}{}: {reason}",
            id.map(|i| format!(" {}", i.short())).unwrap_or_default(),
            peer.map(|p| format!(" from {}", p.short()))
                .unwrap_or_default()
        ),
    }
}

pub(crate) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Show(a) => {
            let (path, _) = log_path(&a.which)?;
            let contents = read_log(&path)?;
            for signed in &contents.records {
                let record = signed.verify().with_context(|| {
                    "a record's signature does not verify; run `drift audit verify`"
                })?;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "seq": record.seq,
                            "at": record.at.as_millis(),
                            "prev": record.prev.to_string(),
                            "signer": signed.signer().to_string(),
                            "event": record.event,
                        })
                    );
                } else {
                    println!(
                        "{:>6}  {}  {}",
                        record.seq,
                        record.at,
                        describe(&record.event)
                    );
                }
            }
            if let Some(offset) = contents.partial {
                eprintln!("(the log ends in a partial record at byte {offset})");
            }
        }
        AuditCommand::Verify(a) => {
            let (path, config) = log_path(&a.which)?;
            let node = match (a.node, &config) {
                (Some(n), _) => n,
                (None, Some(c)) => read_key(&c.node.key)?.public(),
                (None, None) => bail!("name the signer with --node ID (or use --config)"),
            };
            let head_path = a
                .head
                .clone()
                .unwrap_or_else(|| path.with_file_name(HEAD_FILE));
            let anchor = read_head(&head_path)?;
            if anchor.is_none() {
                eprintln!(
                    "note: no anchor at {}: a cut-off tail cannot be detected",
                    head_path.display()
                );
            }
            let summary = verify_file(&path, &node, anchor)?;
            println!(
                "ok: {} records signed by {}, chained{}",
                summary.records,
                node,
                match (summary.head, anchor) {
                    (Some((seq, hash)), Some(_)) =>
                        format!(", head {seq} {} matches the anchor", hash.short()),
                    _ => String::new(),
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
