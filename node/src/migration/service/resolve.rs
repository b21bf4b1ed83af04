//! The resolve protocol (`/drift/resolve/1`): a source that lost contact after its switchover
//! asks the target what became of the migration, and acts on the signed answer; the target
//! answers from its records, or from its audit log once the record was pruned.

use super::*;

impl Migrations {
    /// Answers one resolve query from `from`.
    pub(super) async fn answer_resolve<S>(&self, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<ResolveQuery>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let refuse = |reason: String| {
            self.state.audit(AuditEvent::Refused {
                id: None,
                peer: Some(from),
                reason,
            });
        };
        let signed = match read {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return refuse(format!("resolve stream without a valid query: {e}")),
            Err(_) => return refuse("resolve stream sent no query in time".into()),
        };
        let query = match validate_resolve_query(&signed, &from, &self.state.me) {
            Ok(q) => q,
            Err(e) => return refuse(format!("resolve query refused: {e}")),
        };
        let live = lock(&self.receiving).contains(&query.id);
        // A source that asks rather than recovers has given up on a post-copy link: the
        // target stops waiting for one, and the migration ends incomplete here.
        if live {
            if let Some(door) = lock(&self.doors).get(&query.id) {
                if door.abandon_if_waiting(&from) {
                    warn!(migration = %query.id.short(), "the source resolves instead of recovering: no longer waiting for a new link");
                }
            }
        }
        let outcome = if live {
            ResolveOutcome::InProgress
        } else {
            match self.records.get(&query.id) {
                Some(r) if r.role != Role::Target || r.peer != from => {
                    return refuse(format!(
                        "resolve query for migration {} from a node that is not its source",
                        query.id.short()
                    ))
                }
                Some(r) => match r.phase {
                    Phase::Committed { root } => ResolveOutcome::Committed { root },
                    Phase::Aborted => ResolveOutcome::NeverRan,
                    Phase::Incomplete | Phase::RunningPostCopy => ResolveOutcome::RunningIncomplete,
                    _ => ResolveOutcome::InProgress,
                },
                None => self.outcome_from_audit(&query.id, &from),
            }
        };
        if outcome != ResolveOutcome::InProgress {
            self.state.audit(AuditEvent::Resolved {
                id: query.id,
                side: Side::Target,
                outcome: outcome.label().into(),
            });
        }
        let answer = ResolveAnswer {
            id: query.id,
            query: signed.hash(),
            source: query.source,
            target: self.state.me,
            outcome,
            answered_at: crate::clock::now(),
        };
        let _ = write_typed(&mut stream, &Signed::sign(&answer, &self.key)).await;
    }

    /// For a migration with no record left (records are pruned once finished): the audit log
    /// says whether it committed here; anything else never ran here.
    fn outcome_from_audit(&self, id: &MigrationId, source: &NodeId) -> ResolveOutcome {
        let path = self.state.audit_path();
        let Ok(contents) = crate::audit::read_log(&path) else {
            // Unknowable now: the source asks again rather than act on a guess.
            return ResolveOutcome::InProgress;
        };
        let mut accepted_from_source = false;
        for r in &contents.records {
            let Ok(rec) = r.verify() else { continue };
            match rec.event {
                AuditEvent::Commit {
                    id: i,
                    side: Side::Target,
                    root,
                } if &i == id => return ResolveOutcome::Committed { root },
                AuditEvent::OfferReceived {
                    id: i, source: s, ..
                } if &i == id => {
                    accepted_from_source |= &s == source;
                }
                _ => {}
            }
        }
        let _ = accepted_from_source;
        ResolveOutcome::NeverRan
    }

    /// Asks the target about `id` until it knows, then acts on the answer. The VM stays
    /// paused (and guarded against another migration) meanwhile.
    pub(super) fn spawn_resolver(self: &Arc<Self>, id: MigrationId) {
        let Some(record) = self.records.get(&id) else {
            return;
        };
        if !lock(&self.resolving).insert(id) {
            return;
        }
        lock(&self.outgoing).insert(record.vm);
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            let mut attempts = 0u64;
            loop {
                tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempts += 1;
                match this.ask_target(&record).await {
                    Ok(ResolveOutcome::InProgress) => {}
                    Ok(outcome) => {
                        this.apply_resolution(&record, outcome).await;
                        break;
                    }
                    Err(e) => {
                        if attempts % 10 == 1 {
                            warn!(migration = %id.short(), error = %e, attempts, "cannot resolve yet");
                        }
                    }
                }
                delay = (delay * 2).min(MAX_RESOLVE_BACKOFF);
            }
            lock(&this.resolving).remove(&id);
            lock(&this.outgoing).remove(&record.vm);
        });
    }

    async fn ask_target(&self, record: &Record) -> Result<ResolveOutcome, String> {
        let query = ResolveQuery {
            id: record.id,
            source: self.state.me,
            target: record.peer,
            asked_at: crate::clock::now(),
        };
        let signed = Signed::sign(&query, &self.key);
        let mut stream = self
            .mesh
            .open_stream(&record.peer, RESOLVE_PROTOCOL, Duration::from_secs(5))
            .await?;
        write_typed(&mut stream, &signed)
            .await
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            read_typed::<_, Signed<ResolveAnswer>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
        let answer = validate_resolve_answer(&answer, &signed, &query).map_err(|e| {
            self.state.audit(AuditEvent::Refused {
                id: Some(record.id),
                peer: Some(record.peer),
                reason: format!("resolve answer refused: {e}"),
            });
            e.to_string()
        })?;
        Ok(answer.outcome)
    }

    async fn apply_resolution(&self, record: &Record, outcome: ResolveOutcome) {
        let id = record.id;
        self.state.audit(AuditEvent::Resolved {
            id,
            side: Side::Source,
            outcome: outcome.label().into(),
        });
        match outcome {
            ResolveOutcome::Committed { root } => {
                self.state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Source,
                    root,
                });
                let _ = self.advance(
                    &id,
                    Phase::Committed { root },
                    &format!("resolved: the target committed root {}", root.short()),
                );
                self.destroy(&record.vm).await;
                info!(vm = %record.vm_name, "resolved: the VM runs on the target; source copy destroyed");
            }
            ResolveOutcome::NeverRan => {
                let detail = match self.resume(&record.vm).await {
                    Ok(()) => "resolved: the target never ran it; resumed here".to_string(),
                    Err(e) => format!("resolved: the target never ran it; resume failed: {e}"),
                };
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: detail.clone(),
                });
                let _ = self.advance(&id, Phase::Aborted, &detail);
                info!(vm = %record.vm_name, "{detail}");
            }
            ResolveOutcome::RunningIncomplete => {
                // The guest ran on at the target past this copy: resuming it would fork the
                // VM. Post-copy without its source is lost (design §4).
                let detail = "resolved: post-copy ran on the target without every page; VM lost";
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: detail.into(),
                });
                let _ = self.advance(&id, Phase::Incomplete, detail);
                self.destroy(&record.vm).await;
                error!(vm = %record.vm_name, "{detail}");
            }
            ResolveOutcome::InProgress => {}
        }
    }
}
