//! The target's side of a migration: an offer arrives on a migration stream, admission
//! decides, the decision (with the data endpoint) goes back, and the transfer or the tunnel runs
//! on what the source opened.

use super::*;
use crate::migration::recover::Door;

impl Migrations {
    pub(super) async fn incoming<S>(self: &Arc<Self>, from: NodeId, mut stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.limits.negotiation_timeout;
        let read = tokio::time::timeout(
            timeout,
            read_typed::<_, Signed<MigrationOffer>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await;
        let signed = match read {
            Ok(Ok(signed)) => signed,
            Ok(Err(e)) => {
                let what = match super::super::frames::decode_error(&e) {
                    Some(d) => format!("malformed frame ({}): {d}", d.label()),
                    None => e.to_string(),
                };
                self.state.audit(AuditEvent::Refused {
                    id: None,
                    peer: Some(from),
                    reason: format!("migration stream did not start with a valid offer: {what}"),
                });
                return;
            }
            Err(_) => {
                self.state.audit(AuditEvent::Refused {
                    id: None,
                    peer: Some(from),
                    reason: format!(
                        "migration stream sent no offer in time: stalled: no offer within {:.1} s",
                        timeout.as_secs_f64()
                    ),
                });
                return;
            }
        };
        let now = crate::clock::now();
        let load = self.host_load();
        let verdict = if self
            .state
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            Err(RejectReason::Draining)
        } else {
            let roster = self.state.roster();
            let mut adm = lock(&self.admission);
            adm.decide(&signed, &from, &self.state.me, &roster.roster, &load, now)
        };
        let (offer, reservation) = match verdict {
            Ok(ok) => ok,
            Err(reason) => {
                self.state.metrics.offer_refused(reason.label());
                self.state.audit(AuditEvent::Refused {
                    id: signed.verify().ok().map(|o| o.id),
                    peer: Some(from),
                    reason: format!("offer refused: {} ({reason})", reason.label()),
                });
                info!(from = %from.short(), %reason, "refused a migration offer");
                // Answer only well-formed offers; others get nothing.
                if let Ok(o) = signed.verify() {
                    let _ = self
                        .decide(&mut stream, &signed, &o, Verdict::Reject(reason))
                        .await;
                }
                return;
            }
        };
        self.state.audit(AuditEvent::OfferReceived {
            id: offer.id,
            vm: offer.vm.id,
            source: from,
            offer: signed.hash(),
        });
        let id = offer.id;
        lock(&self.receiving).insert(id);
        self.receive(from, stream, signed, offer, reservation.until)
            .await;
        self.release(&id);
        lock(&self.receiving).remove(&id);
    }

    async fn receive<S>(
        self: &Arc<Self>,
        from: NodeId,
        mut stream: S,
        signed: Signed<MigrationOffer>,
        offer: MigrationOffer,
        reserved_until: drift_protocol::Timestamp,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // A QEMU VM's spec names files this node's QEMU will open: only shared images.
        if let Some(q) = &offer.vm.qemu {
            let checked = match QemuSpec::from_wire(q).check_incoming(&self.qemu_image_dirs) {
                Ok(()) => {
                    self.state
                        .vms
                        .qemu()
                        .check_multifd(q.multifd_channels)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                self.state.audit(AuditEvent::Refused {
                    id: Some(offer.id),
                    peer: Some(from),
                    reason: format!("offer refused: bad_offer (QEMU VM: {e})"),
                });
                warn!(from = %from.short(), error = %e, "refused a QEMU VM");
                let _ = self
                    .decide(
                        &mut stream,
                        &signed,
                        &offer,
                        Verdict::Reject(RejectReason::BadOffer),
                    )
                    .await;
                return;
            }
        }
        let now = crate::clock::now();
        // Durable before anything exists here: an incoming VM is always accounted for.
        let record = Record {
            id: offer.id,
            role: Role::Target,
            vm: offer.vm.id,
            vm_name: offer.vm.name.clone(),
            peer: from,
            mode: offer.mode,
            phase: Phase::Receiving,
            started_at: now,
            updated_at: now,
            detail: String::new(),
            progress: None,
        };
        if let Err(e) = self.records.put(&record) {
            error!(error = %e, "cannot record an incoming migration; refusing it");
            let _ = self
                .decide(
                    &mut stream,
                    &signed,
                    &offer,
                    Verdict::Reject(RejectReason::Busy),
                )
                .await;
            return;
        }
        // An empty, paused VM ready to receive the memory.
        let spec = VmSpec {
            id: offer.vm.id,
            name: offer.vm.name.clone(),
            memory_mib: offer.vm.memory_mib,
            vcpus: offer.vm.vcpus,
            demand_permille: offer.vm.demand_permille,
            dirty_pages_per_s: 0,
            page_random_pct: None,
            placement: offer.vm.placement.clone(),
            seed: OsRng.next_u64() >> 1,
            incoming: true,
            qemu: offer.vm.qemu.as_ref().map(QemuSpec::from_wire),
        };
        if let Err(e) = self.state.vms.create(spec.clone()).await {
            warn!(error = %e, "could not prepare the incoming VM");
            let _ = self.advance(&offer.id, Phase::Aborted, &format!("no VM: {e}"));
            let _ = self
                .decide(
                    &mut stream,
                    &signed,
                    &offer,
                    Verdict::Reject(RejectReason::Busy),
                )
                .await;
            return;
        }
        // The data connections this migration may bind, registered before the decision
        // announces where to open them.
        let claims = Arc::new(AtomicU64::new(0));
        let granted = self.grant_connections(&offer);
        let expectation = match (&self.data, granted) {
            (Some(d), n) if n > 0 => {
                Some(d.expect(offer.id, from, signed.hash(), n, claims.clone()))
            }
            _ => None,
        };
        let endpoint = match (&self.data, &expectation) {
            (Some(d), Some(_)) => Some(d.endpoint(granted)),
            _ => None,
        };
        if self
            .decide(
                &mut stream,
                &signed,
                &offer,
                Verdict::Accept {
                    reserved_until,
                    data: endpoint,
                },
            )
            .await
            .is_err()
        {
            self.discard(&offer, "decision not delivered").await;
            return;
        }
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Target,
            peer: from,
        });
        let hooks = SideHooks {
            service: self.clone(),
            id: offer.id,
            vm: offer.vm.id,
            peer: from,
            side: Side::Target,
        };
        let outcome = match &offer.vm.qemu {
            Some(q) => {
                let dir = self.state.vms.dir_of(&offer.vm.id);
                match self.state.vms.qemu().qmp(&dir).await {
                    Ok(qmp) => {
                        let mut target = QemuTarget {
                            qmp,
                            vm_dir: dir,
                            id: offer.id,
                            offer: signed.hash(),
                            source: from,
                            key: self.key.clone(),
                            params: QemuParams {
                                mode: offer.mode,
                                multifd_channels: q.multifd_channels,
                                downtime_limit: Duration::ZERO,
                                bandwidth_cap: None,
                            },
                            tunnels: self.tunnels.clone(),
                            data: expectation,
                            claims,
                            progress: self.limits.progress,
                            memory_bytes: offer.vm.memory_mib << 20,
                            door: None,
                        };
                        // A migration that may end in post-copy gets a door for a recovery.
                        let _door = (offer.mode != Mode::PreCopy).then(|| {
                            let (door, bell) = Door::new(offer.id, signed.hash(), from);
                            target.door = Some(bell);
                            self.door(offer.id, door)
                        });
                        lock(&self.admission).start(&offer.id);
                        run_target_qemu(target, &hooks, stream).await
                    }
                    Err(e) => Err(EngineError::Vmm(format!("QMP: {e}"))),
                }
            }
            None => {
                let accepted = Accepted {
                    id: offer.id,
                    offer: signed.hash(),
                    source: from,
                    mode: offer.mode,
                    page_count: offer.vm.memory_mib * 256,
                    data_connections: granted,
                };
                self.receive_sandbox(&offer, &hooks, stream, accepted, expectation)
                    .await
            }
        };
        let id = offer.id;
        match outcome {
            Ok(TargetOutcome::Committed { root }) => {
                info!(vm = %offer.vm.name, from = %from.short(), root = %root.short(), "VM arrived and runs here");
            }
            Ok(TargetOutcome::Incomplete { reason }) => {
                warn!(vm = %offer.vm.name, %reason, "post-copy incomplete");
                let _ = self.advance(&id, Phase::Incomplete, &reason);
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Target,
                    reason,
                });
            }
            Ok(TargetOutcome::Aborted { reason }) => self.discard(&offer, &reason).await,
            Ok(TargetOutcome::Faulted { reason, code }) => {
                warn!(vm = %offer.vm.name, from = %from.short(), ?code, %reason, "incoming migration ended: the source's fault");
                self.discard(&offer, &reason).await;
                self.strike(from);
            }
            Err(e) => {
                // What the VM is now follows from what was recorded before the failure.
                match self.records.get(&id).map(|r| r.phase) {
                    Some(Phase::Committed { .. }) => {
                        warn!(error = %e, vm = %offer.vm.name, "committed, but the transfer failed after: resuming");
                        if let Err(e) = self.resume(&offer.vm.id).await {
                            error!(error = %e, "could not resume a committed VM");
                        }
                    }
                    Some(Phase::RunningPostCopy) => {
                        let reason = format!("post-copy failed: {e}");
                        error!(vm = %offer.vm.name, %reason, "incoming post-copy ended without every page");
                        let _ = self.advance(&id, Phase::Incomplete, &reason);
                        self.state.audit(AuditEvent::Abort {
                            id,
                            side: Side::Target,
                            reason,
                        });
                    }
                    _ => self.discard(&offer, &e.to_string()).await,
                }
            }
        }
    }

    /// Data connections this node grants an offer: a sandbox transfer as many as asked, up
    /// to this node's own count; a QEMU migration one per channel, or none.
    fn grant_connections(&self, offer: &MigrationOffer) -> u32 {
        let Some(d) = &self.data else { return 0 };
        match &offer.vm.qemu {
            Some(q) if offer.data_connections == 1 + q.multifd_channels => offer.data_connections,
            Some(_) => 0,
            None => offer.data_connections.min(d.connections()),
        }
    }

    /// The target side of a sandbox transfer: `Start` on the migration stream says where the
    /// frames follow (that stream, or the data connections), then the engine runs. A source
    /// that sends no `Start`, a bad one, or not its data connections in time is at fault.
    async fn receive_sandbox<S>(
        self: &Arc<Self>,
        offer: &MigrationOffer,
        hooks: &SideHooks,
        mut stream: S,
        accepted: Accepted,
        expectation: Option<Expectation>,
    ) -> Result<TargetOutcome, EngineError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let page_count = accepted.page_count;
        let offer_hash = accepted.offer;
        let mut receiver = Receiver::new(accepted);
        let timeout = self.limits.start_timeout;
        let n = match self.read_start(&mut stream, &mut receiver, timeout).await {
            Ok(n) => n,
            Err(Some((code, reason))) => {
                let abort = TransferFrame::Abort(Abort {
                    id: offer.id,
                    reason: code.clone(),
                });
                let _ = write_frame(&mut stream, &abort).await;
                return Ok(TargetOutcome::Faulted { reason, code });
            }
            Err(None) => {
                return Ok(TargetOutcome::Aborted {
                    reason: "the source went away before the transfer started".into(),
                });
            }
        };
        if !lock(&self.admission).start(&offer.id) {
            return Ok(TargetOutcome::Aborted {
                reason: "the reservation expired before the transfer started".into(),
            });
        }
        let vmm = self.vmm(&offer.vm.id);
        let progress = self.limits.progress;
        // A transfer that may end in post-copy gets a door for a new link (see `recover`).
        let (bell, _door) = if offer.mode == Mode::PreCopy {
            (None, None)
        } else {
            let (door, bell) = Door::new(offer.id, offer_hash, offer.source);
            (Some(bell), Some(self.door(offer.id, door)))
        };
        if n == 0 {
            let link = Link::stream(stream, Some(page_count));
            return run_target(
                &vmm, hooks, link, receiver, offer.id, &self.key, progress, bell,
            )
            .await;
        }
        let Some(mut expectation) = expectation else {
            return Ok(TargetOutcome::Aborted {
                reason: "data connections announced, none granted".into(),
            });
        };
        let conns = match expectation.all(n, timeout).await {
            Ok(c) => c,
            Err(e) => {
                let abort = TransferFrame::Abort(Abort {
                    id: offer.id,
                    reason: AbortReason::Stalled,
                });
                let _ = write_frame(&mut stream, &abort).await;
                return Ok(TargetOutcome::Faulted {
                    reason: format!("stalled: {e}"),
                    code: AbortReason::Stalled,
                });
            }
        };
        if let Some(r) = self.records.get(&offer.id) {
            let detail = format!("data: {n} × {}", crate::dataplane::describe(&conns[0]));
            let _ = self.advance(&offer.id, r.phase, &detail);
        }
        let link = Link::data_target(conns, page_count);
        // The migration stream stays open alongside, idle, until the transfer ends.
        let outcome = run_target(
            &vmm, hooks, link, receiver, offer.id, &self.key, progress, bell,
        )
        .await;
        drop(stream);
        drop(expectation);
        outcome
    }

    /// Reads the transfer's `Start` into `receiver`: the data connections it announces.
    /// `Err(Some((code, reason)))`: the source's fault; `Err(None)`: the source went away.
    async fn read_start<S>(
        &self,
        stream: &mut S,
        receiver: &mut Receiver,
        timeout: Duration,
    ) -> Result<u32, Option<(AbortReason, String)>>
    where
        S: tokio::io::AsyncRead + Unpin,
    {
        match tokio::time::timeout(timeout, read_frame(stream)).await {
            Ok(Ok(Some(start))) => match receiver.on_frame(&start) {
                Ok(_) => Ok(match start {
                    TransferFrame::Start(s) => s.data_connections,
                    _ => 0,
                }),
                Err(e) => Err(Some((
                    e.abort_reason(),
                    format!("protocol: bad start: {e}"),
                ))),
            },
            Ok(Ok(None)) => Err(None),
            Ok(Err(e)) => match super::super::frames::decode_error(&e) {
                Some(d) => Err(Some((
                    AbortReason::Malformed,
                    format!("{}: the transfer's first frame: {d}", d.label()),
                ))),
                None => Err(None),
            },
            Err(_) => Err(Some((
                AbortReason::Stalled,
                format!(
                    "stalled: no Start within {:.1} s of the decision",
                    timeout.as_secs_f64()
                ),
            ))),
        }
    }

    /// A migration from `from` stalled or broke the protocol: counted against it, and a
    /// back-off it earns is audited.
    fn strike(&self, from: NodeId) {
        let backed_off = lock(&self.admission).strike(&from, crate::clock::now());
        if let Some(b) = backed_off {
            let secs = b.until.millis_since(crate::clock::now()) as f64 / 1000.0;
            warn!(source = %from.short(), secs, level = b.level, "source backed off");
            self.state.audit(AuditEvent::Refused {
                id: None,
                peer: Some(from),
                reason: format!(
                    "source backed off for {secs:.0} s (back-off {}): its migrations stalled or broke the protocol",
                    b.level
                ),
            });
        }
    }

    fn release(&self, id: &MigrationId) {
        lock(&self.admission).release(id);
    }

    /// The VM never ran here: recorded as such first, then the copy goes.
    async fn discard(&self, offer: &MigrationOffer, reason: &str) {
        let _ = self.advance(&offer.id, Phase::Aborted, reason);
        self.state.audit(AuditEvent::Abort {
            id: offer.id,
            side: Side::Target,
            reason: reason.to_string(),
        });
        self.destroy(&offer.vm.id).await;
    }

    async fn decide<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        signed: &Signed<MigrationOffer>,
        offer: &MigrationOffer,
        verdict: Verdict,
    ) -> std::io::Result<()> {
        let accepted = matches!(verdict, Verdict::Accept { .. });
        let reason = match &verdict {
            Verdict::Reject(r) => r.to_string(),
            Verdict::Accept { .. } => String::new(),
        };
        let decision = MigrationDecision {
            id: offer.id,
            offer: signed.hash(),
            source: offer.source,
            target: self.state.me,
            verdict,
            issued_at: crate::clock::now(),
        };
        self.state.audit(AuditEvent::Decision {
            id: offer.id,
            accepted,
            reason,
        });
        write_typed(stream, &Signed::sign(&decision, &self.key)).await
    }
}
