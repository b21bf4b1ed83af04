//! The libp2p behaviour of a drift node, and the mapping between drift ids and libp2p ids.
//!
//! Gatekeepers come first (libp2p asks behaviours in field order and the first refusal wins):
//! the roster allow list refuses any peer that is not a member right after the Noise handshake
//! has proven its key, before any drift protocol runs on the connection; the connection limits
//! bound pending and established connections. Then gossipsub (anonymous, content-addressed,
//! application-validated against drift's own signatures, scored) and identify.

use std::time::Duration;

use drift_protocol::NodeId;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::gossipsub::{self, IdentTopic};
use libp2p::identity::{self, Keypair, PublicKey};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, PeerId};

/// Gossip topic of load reports.
pub const REPORT_TOPIC: &str = "drift/load-reports/v1";
/// Gossip topic of roster announcements.
pub const ROSTER_TOPIC: &str = "drift/roster/v1";
/// Gossip topic of signed audit heads (`crate::witness`).
pub const AUDIT_HEAD_TOPIC: &str = "drift/audit-heads/v1";
/// The largest gossip message (a roster announcement of several epochs); load reports are
/// refused by validation above 512 bytes.
pub const MAX_GOSSIP_MESSAGE: usize = 1024 * 1024;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Off only with `insecure_open`.
    pub(crate) allow: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) identify: identify::Behaviour,
    /// Raw streams: one per migration (`/drift/migrate/2`).
    pub(crate) stream: libp2p_stream::Behaviour,
}

/// The libp2p peer id of a drift node (the same ed25519 key).
pub fn peer_id(node: &NodeId) -> PeerId {
    let key = identity::ed25519::PublicKey::try_from_bytes(node.as_bytes())
        .expect("NodeId holds a valid ed25519 point");
    PublicKey::from(key).to_peer_id()
}

/// The drift node id of a libp2p peer, if its id embeds an ed25519 key.
pub fn node_id(peer: &PeerId) -> Option<NodeId> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    NodeId::from_bytes(key.try_into_ed25519().ok()?.to_bytes()).ok()
}

/// The libp2p keypair of a drift secret key.
pub fn keypair(key: &drift_protocol::SecretKey) -> Keypair {
    let seed = key.to_bytes();
    Keypair::ed25519_from_bytes(*seed).expect("a 32-byte seed is a valid ed25519 secret")
}

/// The id of a gossip message: its content's hash (20 bytes of blake3), so the same signed
/// report is the same message whoever forwards it.
fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(&blake3::hash(&m.data).as_bytes()[..20])
}

fn gossipsub() -> Result<gossipsub::Behaviour, String> {
    // Every report and roster is signed by drift itself (its host, or the admin) and checked
    // before anything reads it, so a gossipsub-level signature with its author and sequence
    // number would only double each message's size. Messages go out anonymous; signed ones
    // from nodes of earlier versions are still verified and read (`Permissive`).
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(700))
        .validation_mode(gossipsub::ValidationMode::Permissive)
        .message_id_fn(message_id)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_MESSAGE)
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, config)?;
    // Invalid messages cost the peer that forwarded them dearly; silence is not punished (the
    // topics are quiet by design), and many peers on one address are fine (testnets).
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: gossipsub::score_parameter_decay(Duration::from_secs(
            600,
        )),
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    for topic in [REPORT_TOPIC, ROSTER_TOPIC, AUDIT_HEAD_TOPIC] {
        params
            .topics
            .insert(IdentTopic::new(topic).hash(), topic_params.clone());
    }
    behaviour.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
    Ok(behaviour)
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        insecure_open: bool,
        max_connections: u32,
    ) -> Result<Self, String> {
        let limits = ConnectionLimits::default()
            .with_max_pending_incoming(Some(64))
            .with_max_pending_outgoing(Some(64))
            .with_max_established(Some(max_connections))
            .with_max_established_per_peer(Some(2));
        Ok(Self {
            allow: Toggle::from((!insecure_open).then(allow_block_list::Behaviour::default)),
            limits: connection_limits::Behaviour::new(limits),
            gossipsub: gossipsub()?,
            identify: identify::Behaviour::new(
                identify::Config::new("/drift/id/1.0.0".into(), key.public())
                    .with_agent_version(format!("drift/{}", env!("CARGO_PKG_VERSION"))),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drift_protocol::SecretKey;
    use rand_core::OsRng;

    #[test]
    fn node_and_peer_ids_map_both_ways() {
        let key = SecretKey::generate(&mut OsRng);
        let id = key.public();
        let peer = peer_id(&id);
        assert_eq!(node_id(&peer), Some(id));
        assert_eq!(keypair(&key).public().to_peer_id(), peer);
    }
}
