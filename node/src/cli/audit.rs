//! `drift audit show | verify | witnessed`.
//!
//! `verify --witnesses` checks a log against the audit heads its node's peers countersigned
//! (read from their admin sockets or from files `drift audit witnessed --out` wrote), so a node
//! that rewrote, cut or forked its own history is named with the first witnessed head it
//! contradicts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use drift_protocol::{AuditEvent, NodeId};

use drift_protocol::codec::{encode_frame, FrameDecoder, MAX_FRAME_LEN};
use drift_protocol::witness::{self, WitnessBook};

use crate::audit::{read_head, read_log, verify_file, HEAD_FILE, LOG_FILE};
use crate::config::Config;
use crate::identity::read_key;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the records of an audit log.
    Show(ShowArgs),
    /// Check an audit log: signatures, hash chain, and the anchor; names the first bad record.
    Verify(VerifyArgs),
    /// Print, or save for `verify --witnesses`, the audit heads of peers a running node
    /// countersigned.
    Witnessed(WitnessedArgs),
}

#[derive(Debug, Args)]
pub struct WitnessedArgs {
    #[command(flatten)]
    pub target: super::daemon::Target,
    /// Write the heads (signed, countersigned) to this file instead of printing them.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    /// Also check the log against the heads peers witnessed: a running peer's admin socket,
    /// or a file from `drift audit witnessed --out`. Repeatable.
    #[arg(long = "witnesses", value_name = "SOCKET_OR_FILE", num_args = 1..)]
    pub witnesses: Vec<PathBuf>,
}

/// The witnessed heads held by a running node (its admin socket) or saved in a file.
fn witnesses_from(src: &std::path::Path) -> anyhow::Result<WitnessBook> {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::metadata(src)
        .with_context(|| format!("witnesses {}", src.display()))?
        .file_type()
        .is_socket();
    let bytes = if is_socket {
        super::daemon::runtime()?
            .block_on(crate::control::client::get_bytes(
                src,
                "/v1/audit/witnessed",
            ))?
            .to_vec()
    } else {
        std::fs::read(src).with_context(|| format!("witnesses {}", src.display()))?
    };
    FrameDecoder::new(MAX_FRAME_LEN * 16)
        .decode_exact::<WitnessBook>(&bytes)
        .with_context(|| format!("{} does not hold witnessed audit heads", src.display()))
}

fn log_path(which: &LogArgs) -> anyhow::Result<(PathBuf, Option<Config>)> {
    let (path, config) = match (&which.config, &which.file) {
        (Some(c), _) => {
            let config = Config::load(c)?;
            (config.node.state_dir.join(LOG_FILE), Some(config))
        }
        (None, Some(l)) => (l.clone(), None),
        (None, None) => bail!("name the log with --config FILE or --file FILE"),
    };
    // A node starts an empty log where none exists; a reader is told there is none.
    if !path.exists() {
        bail!("no audit log at {}", path.display());
    }
    Ok((path, config))
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
            let witnessed = if a.witnesses.is_empty() {
                String::new()
            } else {
                let mut heads = Vec::new();
                let mut conflicts = Vec::new();
                for src in &a.witnesses {
                    let book = witnesses_from(src)?;
                    heads.extend(book.heads);
                    conflicts.extend(book.conflicts);
                }
                // A conflict a witness recorded is two heads it saw: check both.
                for c in conflicts {
                    heads.push(c.kept);
                    heads.push(c.new);
                }
                let hashes: Vec<drift_protocol::Hash> = read_log(&path)?
                    .records
                    .iter()
                    .map(drift_protocol::audit::chain_hash)
                    .collect();
                let ok = witness::check_log(&node, &hashes, &heads).map_err(|e| {
                    anyhow::anyhow!(
                        "{} contradicts what its peers witnessed: {e}",
                        path.display()
                    )
                })?;
                format!(
                    "; consistent with {} head(s) witnessed by {} peer(s)",
                    ok.heads, ok.witnesses
                )
            };
            println!(
                "ok: {} records signed by {}, chained{}{witnessed}",
                summary.records,
                node,
                match (summary.head, anchor) {
                    (Some((seq, hash)), Some(_)) =>
                        format!(", head {seq} {} matches the anchor", hash.short()),
                    _ => String::new(),
                }
            );
        }
        AuditCommand::Witnessed(a) => {
            let socket = a.target.socket()?;
            let book = witnesses_from(&socket)?;
            if let Some(out) = &a.out {
                crate::durable::write_atomic(
                    out,
                    &encode_frame(&book),
                    0o644,
                    crate::durable::Overwrite::Replace,
                )
                .with_context(|| format!("cannot write {}", out.display()))?;
                eprintln!(
                    "wrote {} witnessed head(s) and {} conflict(s) to {}",
                    book.heads.len(),
                    book.conflicts.len(),
                    out.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut rows = Vec::new();
            for w in &book.heads {
                if let Ok(c) = w.check() {
                    rows.push(vec![
                        c.head.node.short(),
                        c.head.seq.to_string(),
                        c.head.hash.short(),
                        c.seen.to_string(),
                    ]);
                }
            }
            print!(
                "{}",
                super::table::render(&["NODE", "SEQ", "HASH", "SEEN"], &rows)
            );
            for c in &book.conflicts {
                if let (Ok(a), Ok(b)) = (c.kept.check(), c.new.check()) {
                    println!(
                        "CONFLICT: {} showed record {} as {} and as {}",
                        a.head.node,
                        a.head.seq,
                        a.head.hash.short(),
                        b.head.hash.short()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
