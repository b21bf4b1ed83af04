//! The mesh's byte counters, owned by drift: two prometheus-client counters, bytes in and bytes
//! out, that count every byte read from or written to a stream of any libp2p connection the
//! mesh holds (TCP and QUIC alike, every protocol: gossipsub, identify, migration streams).
//! `GET /metrics` serves them as `drift_mesh_bytes_total{direction="in"|"out"}`, from the
//! registry the mesh fills; [`Client::bandwidth`](super::Client::bandwidth) reads the same
//! counters as values.
//!
//! [`MeshBytes::count`] maps a transport's connections to [`CountedMuxer`]s, whose substreams
//! are [`CountedStream`]s: bytes are counted where the swarm reads and writes them, after
//! decryption and demultiplexing, so Noise, QUIC's TLS, yamux framing and packet headers are
//! not included. That is where libp2p's own `libp2p_bandwidth_bytes_total` counts too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::io::{IoSlice, IoSliceMut};
use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::transport::map::Map;
use libp2p::core::{ConnectedPoint, Transport};
use libp2p::PeerId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The metric's name (the exposition adds `_total`).
const NAME: &str = "drift_mesh_bytes";

/// A connection as a transport yields it: the peer and the connection's stream muxer.
type Connection<M> = (PeerId, M);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

/// Bytes the mesh read and wrote. Clones count into the same two counters.
#[derive(Clone, Debug)]
pub(crate) struct MeshBytes {
    inbound: Counter,
    outbound: Counter,
}

impl MeshBytes {
    /// Counters at zero, registered in `registry` (the one `/metrics` renders).
    pub(crate) fn registered(registry: &mut Registry) -> Self {
        let family = Family::<DirectionLabels, Counter>::default();
        let bytes = Self {
            inbound: family.get_or_create_owned(&DirectionLabels { direction: "in" }),
            outbound: family.get_or_create_owned(&DirectionLabels { direction: "out" }),
        };
        registry.register(
            NAME,
            "Bytes read (in) and written (out) on the streams of mesh connections, all \
             protocols, TCP and QUIC, after decryption and demultiplexing",
            family,
        );
        bytes
    }

    /// Bytes read and written so far: (in, out).
    pub(crate) fn get(&self) -> (u64, u64) {
        (self.inbound.get(), self.outbound.get())
    }

    /// `transport` with the streams of every connection it makes counted here.
    pub(crate) fn count<T, M>(
        &self,
        transport: T,
    ) -> Map<T, impl FnOnce(Connection<M>, ConnectedPoint) -> Connection<CountedMuxer<M>> + Clone>
    where
        T: Transport<Output = (PeerId, M)>,
    {
        let bytes = self.clone();
        transport.map(move |(peer, inner), _| (peer, CountedMuxer { inner, bytes }))
    }

    fn stream<S>(&self, inner: S) -> CountedStream<S> {
        CountedStream {
            inner,
            bytes: self.clone(),
        }
    }
}

/// A connection's stream muxer whose substreams count their bytes.
#[derive(Debug)]
pub(crate) struct CountedMuxer<M> {
    inner: M,
    bytes: MeshBytes,
}

impl<M> StreamMuxer for CountedMuxer<M>
where
    M: StreamMuxer + Unpin,
    M::Substream: Unpin,
{
    type Substream = CountedStream<M::Substream>;
    type Error = M::Error;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_inbound(cx)
            .map_ok(|s| this.bytes.stream(s))
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner)
            .poll_outbound(cx)
            .map_ok(|s| this.bytes.stream(s))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

/// A substream that adds the bytes each read and write moved to its connection's counters.
#[derive(Debug)]
pub(crate) struct CountedStream<S> {
    inner: S,
    bytes: MeshBytes,
}

/// Adds the bytes a finished read or write moved to `counter`.
fn tally(counter: &Counter, done: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = &done {
        counter.inc_by(*n as u64);
    }
    done
}

impl<S: AsyncRead + Unpin> AsyncRead for CountedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.inner).poll_read(cx, buf);
        tally(&this.bytes.inbound, done)
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.inner).poll_read_vectored(cx, bufs);
        tally(&this.bytes.inbound, done)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.inner).poll_write(cx, buf);
        tally(&this.bytes.outbound, done)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        tally(&this.bytes.outbound, done)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use drift_protocol::SecretKey;
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::core::muxing::StreamMuxerBox;
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{noise, yamux, StreamProtocol, Swarm};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    use super::*;

    /// (in, out) as libp2p's own bandwidth family counted them, all connections together: read
    /// from its text exposition, the only way to reach that family.
    fn libp2p_counts(registry: &Registry) -> (u64, u64) {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let sum = |direction: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with("libp2p_bandwidth_bytes_total"))
                .filter(|l| l.contains(&format!("direction=\"{direction}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum()
        };
        (sum("Inbound"), sum("Outbound"))
    }

    #[tokio::test]
    async fn a_counted_stream_counts_every_byte_read_and_written() {
        let bytes = MeshBytes::registered(&mut Registry::default());
        // A small pipe: writes and reads come back partial, many times.
        let (near, far) = tokio::io::duplex(61);
        let mut near = bytes.stream(near.compat());
        let mut far = far.compat();

        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let ((), received) = tokio::join!(
            async {
                near.write_all(&sent).await.unwrap();
                near.close().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                far.read_to_end(&mut v).await.unwrap();
                v
            },
        );
        assert_eq!(received, sent);
        assert_eq!(bytes.get(), (0, 100_000));

        let back = vec![7u8; 30_001];
        let ((), got) = tokio::join!(
            async {
                far.write_all(&back).await.unwrap();
                far.close().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                near.read_to_end(&mut v).await.unwrap();
                v
            },
        );
        assert_eq!(got, back);
        assert_eq!(bytes.get(), (30_001, 100_000));
    }

    #[tokio::test]
    async fn vectored_io_is_counted() {
        let bytes = MeshBytes::registered(&mut Registry::default());
        let (near, far) = tokio::io::duplex(1024);
        let mut near = bytes.stream(near.compat());
        let mut far = far.compat();

        let written = near
            .write_vectored(&[IoSlice::new(b"hello, "), IoSlice::new(b"mesh")])
            .await
            .unwrap();
        assert!(written > 0);
        assert_eq!(bytes.get(), (0, written as u64));

        far.write_all(b"0123456789").await.unwrap();
        let (mut a, mut b) = ([0u8; 4], [0u8; 16]);
        let read = near
            .read_vectored(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .await
            .unwrap();
        assert!(read > 0);
        assert_eq!(bytes.get(), (read as u64, written as u64));
    }

    const PROTOCOL: StreamProtocol = StreamProtocol::new("/drift/test-bandwidth/1");

    /// A swarm on the in-memory transport (Noise, yamux) counted by drift, then by libp2p's
    /// bandwidth metrics around it, as the mesh stacks them; both register in `registry`.
    fn swarm(seed: u8, registry: &mut Registry) -> (Swarm<libp2p_stream::Behaviour>, MeshBytes) {
        let key = super::super::keypair(&SecretKey::from_bytes(&[seed; 32]));
        let bytes = MeshBytes::registered(registry);
        let transport = MemoryTransport::default()
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(&key).unwrap())
            .multiplex(yamux::Config::default())
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
        let transport = bytes
            .count(transport)
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
        let transport = libp2p::metrics::BandwidthTransport::new(transport, registry)
            .map(|(p, m), _| (p, StreamMuxerBox::new(m)))
            .boxed();
        let swarm = Swarm::new(
            transport,
            libp2p_stream::Behaviour::new(),
            key.public().to_peer_id(),
            libp2p::swarm::Config::with_tokio_executor()
                .with_idle_connection_timeout(Duration::from_secs(60)),
        );
        (swarm, bytes)
    }

    #[tokio::test]
    async fn two_swarms_count_the_bytes_of_their_streams() {
        let (mut reg_a, mut reg_b) = (Registry::default(), Registry::default());
        let (mut a, bytes_a) = swarm(1, &mut reg_a);
        let (mut b, bytes_b) = swarm(2, &mut reg_b);
        let b_id = *b.local_peer_id();
        let mut incoming = b.behaviour().new_control().accept(PROTOCOL).unwrap();
        let mut control = a.behaviour().new_control();

        let run = async {
            b.listen_on("/memory/0".parse().unwrap()).unwrap();
            let addr = loop {
                if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
                    break address;
                }
            };
            tokio::spawn(async move {
                loop {
                    b.select_next_some().await;
                }
            });
            a.dial(addr).unwrap();
            loop {
                match a.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => break,
                    SwarmEvent::OutgoingConnectionError { error, .. } => panic!("{error}"),
                    _ => {}
                }
            }
            tokio::spawn(async move {
                loop {
                    a.select_next_some().await;
                }
            });

            let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
            let back = vec![9u8; 30_000];
            let dialer = async {
                let mut s = control.open_stream(b_id, PROTOCOL).await.unwrap();
                s.write_all(&sent).await.unwrap();
                s.close().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                got
            };
            let listener = async {
                let (_, mut s) = incoming.next().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(&back).await.unwrap();
                s.close().await.unwrap();
                got
            };
            let (at_a, at_b) = tokio::join!(dialer, listener);
            assert_eq!(at_b, sent);
            assert_eq!(at_a, back);
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the transfer finished");

        let (a_in, a_out) = bytes_a.get();
        let (b_in, b_out) = bytes_b.get();
        // The payload, plus the protocol negotiation (a few dozen bytes) and nothing else.
        for (counted, payload) in [
            (a_out, 100_000),
            (b_in, 100_000),
            (a_in, 30_000),
            (b_out, 30_000),
        ] {
            assert!(
                (payload..payload + 200).contains(&counted),
                "counted {counted} for a payload of {payload}: a {:?}, b {:?}",
                bytes_a.get(),
                bytes_b.get()
            );
        }
        // The same figures as libp2p's own counters, which see the same streams.
        assert_eq!(libp2p_counts(&reg_a), (a_in, a_out));
        assert_eq!(libp2p_counts(&reg_b), (b_in, b_out));
        // And `/metrics` shows them, from the registry the counters were registered in.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg_a).unwrap();
        for (direction, n) in [("in", a_in), ("out", a_out)] {
            let line = format!("drift_mesh_bytes_total{{direction=\"{direction}\"}} {n}\n");
            assert!(text.contains(&line), "{line} missing from {text}");
        }
    }
}
