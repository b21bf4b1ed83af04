//! The source's side of a migration: the offer, the decision, the data connections (or the
//! migration stream when none can be made), the transfer or the tunnel, and acting on how it
//! ended.

use super::*;

impl Migrations {
    /// Offers `vm` to `to` and, once accepted, moves it in the background. Returns when the
    /// target has decided.
    pub async fn migrate(
        self: &Arc<Self>,
        vm: &str,
        to: &str,
        params: SourceParams,
    ) -> Result<MigrationId, MigrateError> {
        params
            .limits
            .validate()
            .map_err(|e| MigrateError::Unsupported(format!("migration limits: {e}")))?;
        let spec = self.state.vms.find(vm)?;
        {
            let mut outgoing = lock(&self.outgoing);
            if outgoing.contains(&spec.id) {
                return Err(MigrateError::Busy(format!(
                    "{} is already migrating",
                    spec.name
                )));
            }
            if outgoing.len() >= self.limits.max_outgoing {
                return Err(MigrateError::Busy(format!(
                    "{} migrations are already leaving this node",
                    self.limits.max_outgoing
                )));
            }
            outgoing.insert(spec.id);
        }
        let result = self.offer_and_start(&spec, to, params).await;
        if result.is_err() {
            lock(&self.outgoing).remove(&spec.id);
        }
        result
    }

    async fn offer_and_start(
        self: &Arc<Self>,
        spec: &VmSpec,
        to: &str,
        params: SourceParams,
    ) -> Result<MigrationId, MigrateError> {
        let spec = spec.clone();
        // What the target agrees to: post-copy if it may come to that.
        let mode = params.wire_mode();
        let (target, epoch) = {
            let roster = self.state.roster();
            let m = roster
                .roster
                .members
                .iter()
                .find(|m| m.name == to || m.id.to_string() == to)
                .ok_or_else(|| MigrateError::NoSuchNode(to.to_string()))?;
            (m.id, roster.roster.epoch)
        };
        if target == self.state.me {
            return Err(MigrateError::ToSelf);
        }
        if let Some(q) = &spec.qemu {
            self.state
                .vms
                .qemu()
                .check_multifd(q.multifd_channels)
                .await
                .map_err(MigrateError::Unsupported)?;
        }
        let now = crate::clock::now();
        let mut nonce = [0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let offer = MigrationOffer {
            id: MigrationId::random(&mut OsRng),
            source: self.state.me,
            target,
            vm: VmSummary {
                id: spec.id,
                name: spec.name.clone(),
                memory_mib: spec.memory_mib,
                vcpus: spec.vcpus,
                demand_permille: spec.demand_permille,
                placement: spec.placement.clone(),
                qemu: spec.qemu.as_ref().map(QemuSpec::to_wire),
            },
            mode,
            nonce,
            issued_at: now,
            expires_at: now.plus_millis(30_000),
            roster_epoch: epoch,
            data_connections: match (&self.data, &spec.qemu) {
                (None, _) => 0,
                (Some(_), Some(q)) => 1 + q.multifd_channels,
                (Some(d), None) => d.connections(),
            },
        };
        self.records
            .put(&Record {
                id: offer.id,
                role: Role::Source,
                vm: spec.id,
                vm_name: spec.name.clone(),
                peer: target,
                mode: params.mode,
                phase: Phase::Copying,
                started_at: now,
                updated_at: now,
                detail: String::new(),
                progress: None,
            })
            .map_err(MigrateError::Record)?;
        let result = self.negotiate(&offer, &spec).await;
        let (stream, signed, endpoint) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let detail = match &e {
                    MigrateError::Refused(r) => format!("refused: {r}"),
                    other => other.to_string(),
                };
                let _ = self.advance(&offer.id, Phase::Aborted, &detail);
                return Err(e);
            }
        };
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        lock(&self.live).insert(offer.id, progress_rx);
        self.state.audit(AuditEvent::TransferStarted {
            id: offer.id,
            side: Side::Source,
            peer: target,
        });
        let cancel = CancellationToken::new();
        lock(&self.cancels).insert(offer.id, cancel.clone());
        let this = self.clone();
        let mut transfer = SourceTransfer {
            transport: String::new(),
            id: offer.id,
            offer: signed.hash(),
            page_count: spec.memory_mib * 256,
            key: self.key.clone(),
            target,
        };
        tokio::spawn(async move {
            let switchover_cost = Duration::from_micros(
                this.switchover_cost_us
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            let params = SourceParams {
                switchover_cost,
                ..params
            };
            let hooks = SideHooks {
                service: this.clone(),
                id: transfer.id,
                vm: spec.id,
                peer: target,
                side: Side::Source,
            };
            let outcome = match &spec.qemu {
                Some(q) => {
                    this.qemu_source(
                        &spec,
                        q,
                        stream,
                        &transfer,
                        endpoint,
                        params,
                        &hooks,
                        &progress_tx,
                        cancel,
                    )
                    .await
                }
                None => match this
                    .open_link(&mut transfer, mode, endpoint.as_ref(), stream)
                    .await
                {
                    Ok((link, control)) => {
                        let reconnect = super::recover::ServiceReconnect {
                            service: this.clone(),
                            id: transfer.id,
                            offer: transfer.offer,
                            target,
                        };
                        let outcome = run_source(
                            &this.vmm(&spec.id),
                            &hooks,
                            &reconnect,
                            link,
                            transfer.clone(),
                            params,
                            &progress_tx,
                            cancel,
                        )
                        .await;
                        drop(control);
                        outcome
                    }
                    Err(e) => Err(e),
                },
            };
            let id = transfer.id;
            lock(&this.cancels).remove(&id);
            this.records.set_progress(&id, progress_tx.borrow().clone());
            lock(&this.live).remove(&id);
            let keep_guard = this.source_finished(id, &spec, outcome).await;
            if !keep_guard {
                lock(&this.outgoing).remove(&spec.id);
            }
        });
        Ok(offer.id)
    }

    /// Folds a measured switchover cost into this node's estimate (half the old, half the new;
    /// within 1 ms to 1 s).
    fn learn_switchover_cost(&self, cost_ms: f64) {
        use std::sync::atomic::Ordering;
        let new = (cost_ms * 1e3).clamp(1e3, 1e6) as u64;
        let old = self.switchover_cost_us.load(Ordering::Relaxed);
        self.switchover_cost_us
            .store(old / 2 + new / 2, Ordering::Relaxed);
    }

    /// The IP addresses this node reaches `peer`'s mesh connections on.
    async fn peer_ips(&self, peer: &NodeId) -> Vec<std::net::IpAddr> {
        use libp2p::multiaddr::Protocol;
        let peers = self.mesh.peers().await.unwrap_or_default();
        let mut ips = Vec::new();
        for p in peers.iter().filter(|p| &p.id == peer) {
            for a in &p.addresses {
                let Ok(m) = a.parse::<libp2p::Multiaddr>() else {
                    continue;
                };
                for proto in m.iter() {
                    let ip = match proto {
                        Protocol::Ip4(ip) => std::net::IpAddr::V4(ip),
                        Protocol::Ip6(ip) => std::net::IpAddr::V6(ip),
                        _ => continue,
                    };
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
            }
        }
        ips
    }

    /// The source side of a sandbox transfer's start: opens the data connections the target
    /// granted and sends `Start` on the migration stream, naming how many carry the transfer
    /// (none, when they cannot be made: the transfer then runs on the migration stream, and
    /// says why in its transport). Returns the link, and the migration stream when it stays
    /// open alongside.
    async fn open_link<S>(
        &self,
        t: &mut SourceTransfer,
        mode: Mode,
        endpoint: Option<&DataEndpoint>,
        mut control: S,
    ) -> Result<(Link, Option<S>), EngineError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let conns = match (&self.data, endpoint) {
            (None, _) => Err("the data plane is off here".to_string()),
            (Some(_), None) => Err("the target announced no data endpoint".to_string()),
            (Some(d), Some(ep)) => {
                let via = self.peer_ips(&t.target).await;
                d.connect_all(t.target, ep, &via, t.id, t.offer, ep.connections)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        let n = conns.as_ref().map_or(0, |c| c.len() as u32);
        let start = TransferFrame::Start(Start {
            id: t.id,
            offer: t.offer,
            mode,
            page_size: PAGE_SIZE as u32,
            page_count: t.page_count,
            data_connections: n,
        });
        write_frame(&mut control, &start).await?;
        match conns {
            Ok(conns) if !conns.is_empty() => {
                t.transport = format!("data: {n} × {}", crate::dataplane::describe(&conns[0]));
                Ok((Link::data_source(conns), Some(control)))
            }
            Ok(_) => Err(EngineError::Protocol("no data connection granted".into())),
            Err(e) => {
                warn!(migration = %t.id.short(), error = %e, "no data connection: the transfer moves on the migration stream");
                t.transport = format!("stream (no data connection: {e})");
                Ok((Link::stream(control, None), None))
            }
        }
    }

    /// The source side of a QEMU VM's migration: QEMU's stream tunnelled through the mesh.
    #[allow(clippy::too_many_arguments)]
    async fn qemu_source<S>(
        &self,
        spec: &VmSpec,
        q: &QemuSpec,
        stream: S,
        transfer: &SourceTransfer,
        endpoint: Option<DataEndpoint>,
        params: SourceParams,
        hooks: &SideHooks,
        progress: &watch::Sender<Progress>,
        cancel: CancellationToken,
    ) -> Result<SourceOutcome, EngineError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let data = match (&self.data, endpoint) {
            (Some(plane), Some(endpoint)) => Some(DataRoute {
                plane: plane.clone(),
                endpoint,
                via: self.peer_ips(&transfer.target).await,
            }),
            _ => None,
        };
        let dir = self.state.vms.dir_of(&spec.id);
        let qmp = self
            .state
            .vms
            .qemu()
            .qmp(&dir)
            .await
            .map_err(|e| EngineError::Vmm(format!("QMP: {e}")))?;
        let source = QemuSource {
            qmp,
            vm_dir: dir,
            mesh: self.mesh.clone(),
            id: transfer.id,
            offer: transfer.offer,
            target: transfer.target,
            key: transfer.key.clone(),
            params: QemuParams {
                mode: params.wire_mode(),
                multifd_channels: q.multifd_channels,
                downtime_limit: params.downtime_limit(),
                bandwidth_cap: params.bandwidth_cap,
            },
            limits: params.limits.clone(),
            commit_timeout: params.commit_timeout,
            data,
        };
        run_source_qemu(source, hooks, stream, progress, cancel).await
    }

    /// Opens the stream, sends the offer and reads the decision.
    async fn negotiate(
        &self,
        offer: &MigrationOffer,
        spec: &VmSpec,
    ) -> Result<
        (
            tokio_util::compat::Compat<libp2p::Stream>,
            Signed<MigrationOffer>,
            Option<DataEndpoint>,
        ),
        MigrateError,
    > {
        let signed = Signed::sign(offer, &self.key);
        self.state.audit(AuditEvent::OfferSent {
            id: offer.id,
            vm: spec.id,
            target: offer.target,
            mode: offer.mode,
            offer: signed.hash(),
        });
        let mut stream = self
            .mesh
            .open_stream(&offer.target, PROTOCOL, Duration::from_secs(15))
            .await
            .map_err(MigrateError::Unreachable)?;
        write_typed(&mut stream, &signed)
            .await
            .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let decision = tokio::time::timeout(
            Duration::from_secs(15),
            read_typed::<_, Signed<MigrationDecision>>(&mut stream, MAX_NEGOTIATION_FRAME),
        )
        .await
        .map_err(|_| MigrateError::Unreachable("no decision in time".into()))?
        .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let decision = validate_decision(&decision, &signed, offer)
            .map_err(|e| MigrateError::BadDecision(e.to_string()))?;
        match decision.verdict {
            Verdict::Reject(reason) => Err(MigrateError::Refused(reason)),
            Verdict::Accept { data, .. } => Ok((stream, signed, data)),
        }
    }

    /// Acts on how a transfer ended at the source. Returns whether the VM stays guarded
    /// (a resolver took it over).
    async fn source_finished(
        self: &Arc<Self>,
        id: MigrationId,
        spec: &VmSpec,
        outcome: Result<SourceOutcome, EngineError>,
    ) -> bool {
        match outcome {
            Ok(SourceOutcome::Committed { commit, progress }) => {
                if let Some(cost) = progress.switchover_cost_ms {
                    self.learn_switchover_cost(cost);
                }
                self.state.audit(AuditEvent::Commit {
                    id,
                    side: Side::Source,
                    root: commit.root,
                });
                if self
                    .advance(
                        &id,
                        Phase::Committed { root: commit.root },
                        &format!("root {}", commit.root.short()),
                    )
                    .is_err()
                {
                    // Not destroyed without a durable record: the resolver retries the write.
                    self.spawn_resolver(id);
                    return true;
                }
                self.destroy(&spec.id).await;
                info!(vm = %spec.name, "VM moved");
                false
            }
            Ok(SourceOutcome::ResumedHere { reason }) => {
                self.state.audit(AuditEvent::Abort {
                    id,
                    side: Side::Source,
                    reason: reason.clone(),
                });
                let _ = self.advance(&id, Phase::Aborted, &reason);
                false
            }
            Ok(SourceOutcome::Unknown { reason }) => {
                warn!(vm = %spec.name, %reason, "migration outcome unknown: VM stays paused; asking the target");
                if let Some(r) = self.records.get(&id) {
                    let _ = self.advance(&id, r.phase, &reason);
                }
                self.spawn_resolver(id);
                true
            }
            Err(e) => {
                let phase = self.records.get(&id).map(|r| r.phase);
                if matches!(phase, Some(Phase::Switching | Phase::HandedOver)) {
                    warn!(error = %e, "migration failed after switchover began; asking the target");
                    self.spawn_resolver(id);
                    true
                } else {
                    let _ = self.advance(&id, Phase::Aborted, &e.to_string());
                    false
                }
            }
        }
    }
}
