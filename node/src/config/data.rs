//! `[data]`: the data plane's listen address, what it announces, and how many connections a
//! migration uses.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// The data plane: the TLS connections a migration's bytes move on (see `crate::dataplane`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Move migrations on data connections. Off: every migration moves on its mesh stream
    /// (slower; the same security).
    #[serde(default = "super::yes")]
    pub enabled: bool,
    /// Where to take data connections, e.g. `0.0.0.0:7401`. Default: the address of the
    /// first TCP address in `node.listen`, at the next port (port 0 stays 0: any free port).
    pub listen: Option<std::net::SocketAddr>,
    /// Addresses to announce to sources, tried in order (e.g. behind a NAT). Default: the
    /// listen address if it names one IP; otherwise sources dial the IP they reach this
    /// node's mesh connection on, at the data port.
    #[serde(default)]
    pub advertise: Vec<std::net::SocketAddr>,
    /// Connections per sandbox migration, so encryption and hashing run on several cores.
    /// Default: this host's cores, at most 8. (A QEMU migration uses one per channel.)
    pub connections: Option<u32>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
            advertise: Vec::new(),
            connections: None,
        }
    }
}

/// Most connections `data.connections` may ask for.
pub const MAX_DATA_CONNECTIONS_PER_MIGRATION: u32 = 16;

impl DataSection {
    /// Connections per sandbox migration.
    pub fn connections(&self) -> u32 {
        self.connections.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get() as u32)
                .clamp(1, 8)
        })
    }

    /// The address to listen on, given the mesh's listen addresses.
    pub fn listen_addr(&self, mesh: &[Multiaddr]) -> std::net::SocketAddr {
        use libp2p::multiaddr::Protocol;
        if let Some(a) = self.listen {
            return a;
        }
        for m in mesh {
            let mut ip = None;
            for p in m.iter() {
                match p {
                    Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
                    Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
                    Protocol::Tcp(port) => {
                        if let Some(ip) = ip {
                            let port = if port == 0 { 0 } else { port.saturating_add(1) };
                            return std::net::SocketAddr::new(ip, port);
                        }
                    }
                    _ => {}
                }
            }
        }
        std::net::SocketAddr::from(([0, 0, 0, 0], 0))
    }

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(n) = self.connections {
            if n == 0 || n > MAX_DATA_CONNECTIONS_PER_MIGRATION {
                return Err((
                    "data.connections",
                    format!("must be between 1 and {MAX_DATA_CONNECTIONS_PER_MIGRATION}"),
                ));
            }
        }
        if self.advertise.len() > drift_protocol::dataplane::MAX_DATA_ADDRS {
            return Err((
                "data.advertise",
                format!(
                    "at most {} addresses",
                    drift_protocol::dataplane::MAX_DATA_ADDRS
                ),
            ));
        }
        Ok(())
    }
}
