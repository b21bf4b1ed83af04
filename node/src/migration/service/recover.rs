//! Post-copy recovery in the service (see [`crate::migration::recover`]): the target answers
//! `/drift/recover/1` streams through the door of the waiting transfer; the source's
//! [`ServiceReconnect`] opens them.

use drift_protocol::transfer::recover::{RecoverAnswer, RecoverRefusal, RecoverRequest};
use drift_protocol::Hash;

use super::*;
use crate::migration::recover::{self, Door, Reconnect, RecoverError, RECOVER_EXCHANGE};

impl Migrations {
    /// Registers the door of an incoming transfer that may end in post-copy; it is removed
    /// when the returned guard drops.
    pub(super) fn door(self: &Arc<Self>, id: MigrationId, door: Door) -> DoorGuard {
        lock(&self.doors).insert(id, door);
        DoorGuard {
            service: self.clone(),
            id,
        }
    }

    /// Answers one recovery stream from `from`.
    pub(super) async fn answer_recover<S>(&self, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let refuse = |id: Option<MigrationId>, reason: String| {
            self.state.audit(AuditEvent::Refused {
                id,
                peer: Some(from),
                reason,
            });
        };
        let read = tokio::time::timeout(
            RECOVER_EXCHANGE,
            read_typed::<_, Signed<RecoverRequest>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let signed = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return refuse(
                    None,
                    format!("recovery stream without a valid request: {e}"),
                )
            }
            Err(_) => return refuse(None, "recovery stream sent no request in time".into()),
        };
        let Ok(claimed) = signed.verify_by(&from) else {
            return refuse(
                None,
                format!("recovery refused: {}", RecoverRefusal::BadSignature),
            );
        };
        let door = lock(&self.doors).get(&claimed.id).cloned();
        let admitted = match door {
            Some(d) => d.admit(&signed, &from, &self.state.me, crate::clock::now()),
            None => Err(RecoverRefusal::NotWaiting),
        };
        let answer = |refusal| RecoverAnswer {
            id: claimed.id,
            request: signed.hash(),
            target: self.state.me,
            refusal,
        };
        match admitted {
            Ok((req, tx)) => {
                let answer = Signed::sign(&answer(None), &self.key);
                if write_typed(&mut stream, &answer).await.is_err() {
                    return;
                }
                info!(migration = %req.id.short(), attempt = req.attempt, "post-copy recovery accepted");
                let _ = tx.send(Box::new(stream)).await;
            }
            Err(why) => {
                refuse(Some(claimed.id), format!("recovery refused: {why}"));
                let _ =
                    write_typed(&mut stream, &Signed::sign(&answer(Some(why)), &self.key)).await;
            }
        }
    }
}

/// Removes a door from the service when the transfer ends.
pub(super) struct DoorGuard {
    service: Arc<Migrations>,
    id: MigrationId,
}

impl Drop for DoorGuard {
    fn drop(&mut self) {
        lock(&self.service.doors).remove(&self.id);
    }
}

/// The source's way to a new link for one post-copy migration: a `/drift/recover/1` stream
/// with a signed request, taken only once the target's signed answer accepts it; an answer
/// that is not the target's is audited.
pub(super) struct ServiceReconnect {
    pub service: Arc<Migrations>,
    pub id: MigrationId,
    pub offer: Hash,
    pub target: NodeId,
}

impl Reconnect for ServiceReconnect {
    async fn reconnect(&self, attempt: u32) -> Result<Link, String> {
        let s = &self.service;
        match recover::open(&s.mesh, &s.key, self.target, self.id, self.offer, attempt).await {
            Ok(stream) => Ok(Link::stream(stream, None)),
            Err(e) => {
                if let RecoverError::BadAnswer(_) = e {
                    s.state.audit(AuditEvent::Refused {
                        id: Some(self.id),
                        peer: Some(self.target),
                        reason: format!("recovery answer refused: {e}"),
                    });
                }
                Err(e.to_string())
            }
        }
    }
}
