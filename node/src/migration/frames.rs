//! Transfer frames on an async byte stream: the header is read first and checked against the
//! limit before the payload is read into a buffer of exactly its length.

use drift_protocol::codec::{
    decode_payload, encode_frame, parse_header, HEADER_LEN, MAX_FRAME_LEN,
};
use drift_protocol::TransferFrame;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<TransferFrame>> {
    let mut header = [0u8; HEADER_LEN];
    // A clean end only before the first byte of a header; a cut header is an error.
    match r.read(&mut header[..1]).await? {
        0 => return Ok(None),
        _ => r.read_exact(&mut header[1..]).await?,
    };
    let len = parse_header(header, MAX_FRAME_LEN)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    decode_payload(&payload)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The longest one frame may take to write: a peer that stops reading, or a connection that
/// closed under a stream without waking it, fails the write instead of hanging it.
pub const WRITE_STALL: Duration = Duration::from_secs(20);

async fn write_bounded<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    let write = async {
        w.write_all(bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(WRITE_STALL, write)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))?
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &TransferFrame,
) -> std::io::Result<usize> {
    let bytes = encode_frame(frame);
    write_bounded(w, &bytes).await?;
    Ok(bytes.len())
}

/// Reads one frame of any type, refusing frames over `max` bytes before reading them.
pub async fn read_typed<R, T>(r: &mut R, max: usize) -> std::io::Result<T>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header).await?;
    let len = parse_header(header, max)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    decode_payload(&payload).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one frame of any type.
pub async fn write_typed<W: AsyncWrite + Unpin, T: serde::Serialize>(
    w: &mut W,
    value: &T,
) -> std::io::Result<()> {
    write_bounded(w, &encode_frame(value)).await
}
