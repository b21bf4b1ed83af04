//! Fault injection at the points of a migration where a crash or a cut matters.
//!
//! Off unless the environment variable `DRIFT_FAULT` is set when `drift run` starts, as
//! `side:point:action`:
//!
//! - side and point: `source:rounds` (a pre-copy round after the first went out),
//!   `source:stop-and-copy` (the VM just paused, its last pages not yet sent),
//!   `source:complete-sent`, `source:commit-received` (before the commit is recorded),
//!   `source:post-copy` (post-copy, the target runs the VM, pages are being pushed),
//!   `target:rounds` (a round after the first arrived), `target:complete-received` (before
//!   verifying), `target:commit-sent`;
//! - action: `kill` (the node sends itself SIGKILL: exactly `kill -9` at that point; VMs live
//!   in their own processes and survive it), `cut` (every connection to the peer, mesh and
//!   data, is closed, as by a network fault; the node carries on), `halt` (the migration waits at that point
//!   while the file `<state_dir>/fault-halt` exists, at most two minutes; another process
//!   kills or cuts meanwhile, then removes the file).
//!
//! Each fault fires once per process. The fault tests in `tests/tests/faults.rs` use it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drift_protocol::NodeId;

use crate::mesh::Client;

/// The environment variable.
pub const ENV: &str = "DRIFT_FAULT";
/// The file a halted migration waits on.
pub const HALT_FILE: &str = "fault-halt";
const MAX_HALT: Duration = Duration::from_secs(120);

/// A point of a migration, on either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    SourceRounds,
    SourceStopAndCopy,
    SourceCompleteSent,
    SourceCommitReceived,
    SourcePostCopy,
    TargetRounds,
    TargetCompleteReceived,
    TargetCommitSent,
}

impl Point {
    fn parse(side: &str, point: &str) -> Option<Self> {
        Some(match (side, point) {
            ("source", "rounds") => Point::SourceRounds,
            ("source", "stop-and-copy") => Point::SourceStopAndCopy,
            ("source", "complete-sent") => Point::SourceCompleteSent,
            ("source", "commit-received") => Point::SourceCommitReceived,
            ("source", "post-copy") => Point::SourcePostCopy,
            ("target", "rounds") => Point::TargetRounds,
            ("target", "complete-received") => Point::TargetCompleteReceived,
            ("target", "commit-sent") => Point::TargetCommitSent,
            _ => return None,
        })
    }
}

/// What happens at the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Kill,
    Cut,
    Halt,
}

/// The fault configured for this process.
#[derive(Debug)]
pub struct Fault {
    point: Point,
    action: Action,
    fired: AtomicBool,
    halt_file: PathBuf,
}

impl Fault {
    /// Reads `DRIFT_FAULT`. `Ok(None)` when unset; an error names what is wrong with it.
    pub fn from_env(state_dir: &std::path::Path) -> Result<Option<Self>, String> {
        let Some(spec) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        let spec = spec.to_string_lossy().into_owned();
        Self::parse(&spec, state_dir).map(Some)
    }

    fn parse(spec: &str, state_dir: &std::path::Path) -> Result<Self, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let [side, point, action] = parts.as_slice() else {
            return Err(format!("{ENV}={spec:?}: expected side:point:action"));
        };
        let point = Point::parse(side, point)
            .ok_or_else(|| format!("{ENV}={spec:?}: unknown point {side}:{point}"))?;
        let action = match *action {
            "kill" => Action::Kill,
            "cut" => Action::Cut,
            "halt" => Action::Halt,
            other => return Err(format!("{ENV}={spec:?}: unknown action {other:?}")),
        };
        Ok(Self {
            point,
            action,
            fired: AtomicBool::new(false),
            halt_file: state_dir.join(HALT_FILE),
        })
    }

    /// Called by the migration at `point` with its peer; acts once if this is the point. A cut
    /// severs the mesh connections and the data connections with the peer.
    pub async fn at(
        &self,
        point: Point,
        peer: &NodeId,
        mesh: &Client,
        data: Option<&crate::dataplane::DataPlane>,
    ) {
        if point != self.point || self.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(?point, action = ?self.action, "fault injection");
        match self.action {
            Action::Kill => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::this(),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // SIGKILL cannot be caught; nothing runs past here.
                std::future::pending::<()>().await;
            }
            Action::Cut => {
                if let Some(d) = data {
                    d.cut(peer);
                }
                let _ = mesh.disconnect(peer).await;
            }
            Action::Halt => {
                if let Err(e) = std::fs::write(&self.halt_file, format!("{point:?}\n")) {
                    tracing::error!(error = %e, "cannot write the halt file");
                    return;
                }
                let until = tokio::time::Instant::now() + MAX_HALT;
                while self.halt_file.exists() && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn specs_parse_or_say_what_is_wrong() {
        let dir = std::path::Path::new("/nonexistent");
        let f = Fault::parse("source:stop-and-copy:kill", dir).unwrap();
        assert_eq!(
            (f.point, f.action),
            (Point::SourceStopAndCopy, Action::Kill)
        );
        let f = Fault::parse("target:commit-sent:cut", dir).unwrap();
        assert_eq!((f.point, f.action), (Point::TargetCommitSent, Action::Cut));
        let e = Fault::parse("source:rounds", dir).err().unwrap();
        assert!(e.contains("side:point:action"), "{e}");
        let e = Fault::parse("target:post-copy:kill", dir).err().unwrap();
        assert!(e.contains("unknown point target:post-copy"), "{e}");
        let e = Fault::parse("source:rounds:explode", dir).err().unwrap();
        assert!(e.contains("explode"), "{e}");
    }
}
