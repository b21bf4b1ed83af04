//! Transfer frames on an async byte stream: the header is read first and checked against the
//! limit before the payload is read into a buffer of exactly its length.

use drift_protocol::codec::{
    check_length, decode_payload, encode_frame, parse_header, DecodeError, HEADER_LEN,
    MAX_FRAME_LEN,
};
use drift_protocol::dataplane::{parse_pages_head, DataFrame, MAX_PAGES_HEAD};
use drift_protocol::TransferFrame;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one transfer frame; `Ok(None)` on a clean end of stream before a header (a cut
/// header is an error).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<TransferFrame>> {
    read_typed_or_end(r, MAX_FRAME_LEN).await
}

/// The longest one frame may take to write: a peer that stops reading, or a connection that
/// closed under a stream without waking it, fails the write instead of hanging it.
pub const WRITE_STALL: Duration = Duration::from_secs(20);

/// Writes `bytes` (and flushes, if `flush`), failing after [`WRITE_STALL`].
pub async fn write_bounded<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    flush: bool,
) -> std::io::Result<()> {
    write_parts_bounded(w, &[bytes], flush).await
}

/// Writes `parts` one after the other (and flushes, if `flush`), failing after
/// [`WRITE_STALL`].
pub async fn write_parts_bounded<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
    flush: bool,
) -> std::io::Result<()> {
    let write = async {
        for part in parts {
            w.write_all(part).await?;
        }
        if flush {
            w.flush().await?;
        }
        Ok(())
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
    write_bounded(w, &bytes, true).await?;
    Ok(bytes.len())
}

/// Reads one frame of any type, refusing frames over `max` bytes before reading them.
pub async fn read_typed<R, T>(r: &mut R, max: usize) -> std::io::Result<T>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    read_typed_or_end(r, max).await?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stream ended before a frame",
        )
    })
}

/// Reads one frame's payload into `buf` (kept between calls, so a stream of large frames costs
/// no allocation and no zeroing per frame), refusing frames over `max` bytes before reading
/// them; `Ok(None)` on a clean end of stream before a header.
pub async fn read_payload<'b, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    buf: &'b mut Vec<u8>,
) -> std::io::Result<Option<&'b [u8]>> {
    let Some(len) = read_header(r, max).await? else {
        return Ok(None);
    };
    if buf.len() < len {
        buf.resize(len, 0);
    }
    r.read_exact(&mut buf[..len]).await?;
    Ok(Some(&buf[..len]))
}

/// Reads one numbered frame of a data connection; `Ok(None)` on a clean end of stream before
/// a header. A `Pages` frame's page data is read straight from the connection into the
/// batch's own buffer (see [`parse_pages_head`]); `scratch` holds its head and every other
/// frame, and is kept between calls.
pub async fn read_data_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    scratch: &mut Vec<u8>,
) -> std::io::Result<Option<DataFrame>> {
    let Some(len) = read_header(r, MAX_FRAME_LEN).await? else {
        return Ok(None);
    };
    let first = len.min(MAX_PAGES_HEAD);
    if scratch.len() < first {
        scratch.resize(first, 0);
    }
    r.read_exact(&mut scratch[..first]).await?;
    let Some(head) = parse_pages_head(&scratch[..first], len).map_err(invalid)? else {
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        r.read_exact(&mut scratch[first..len]).await?;
        return decode_payload(&scratch[..len]).map(Some).map_err(invalid);
    };
    // The data: what came with the head, then the rest straight into the batch's buffer.
    let mut data = super::buffers::take();
    data.clear();
    data.reserve_exact(head.data_len);
    let after_head = &scratch[head.head_len..first];
    let (in_scratch, tail_part) = after_head.split_at(after_head.len().min(head.data_len));
    data.extend_from_slice(in_scratch);
    while data.len() < head.data_len {
        let want = (head.data_len - data.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut data).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut hash = [0u8; 32];
    hash[..tail_part.len()].copy_from_slice(tail_part);
    r.read_exact(&mut hash[tail_part.len()..]).await?;
    Ok(Some(head.into_frame(data, hash)))
}

/// [`read_typed`], with `Ok(None)` on a clean end of stream before a header.
pub async fn read_typed_or_end<R, T>(r: &mut R, max: usize) -> std::io::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let Some(len) = read_header(r, max).await? else {
        return Ok(None);
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    decode_payload(&payload).map(Some).map_err(invalid)
}

fn invalid(e: DecodeError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// What was wrong with a frame a read refused, if it was the frame (not the stream).
pub fn decode_error(e: &std::io::Error) -> Option<&DecodeError> {
    e.get_ref()?.downcast_ref::<DecodeError>()
}

/// Reads a frame header and returns the payload's length: the length is judged as soon as its
/// four bytes are in, so an empty or oversized frame is refused without waiting for its
/// version byte. `Ok(None)` on a clean end of stream before a header (a cut header is an
/// error).
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Option<usize>> {
    let mut header = [0u8; HEADER_LEN];
    if r.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut header[1..4]).await?;
    check_length([header[0], header[1], header[2], header[3]], max).map_err(invalid)?;
    r.read_exact(&mut header[4..]).await?;
    parse_header(header, max).map(Some).map_err(invalid)
}

/// Writes one frame of any type.
pub async fn write_typed<W: AsyncWrite + Unpin, T: serde::Serialize>(
    w: &mut W,
    value: &T,
) -> std::io::Result<()> {
    write_bounded(w, &encode_frame(value), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty or oversized header is refused from its four length bytes, while the peer
    /// keeps the stream open and sends nothing more: no wait for a negotiation timeout.
    #[tokio::test]
    async fn an_impossible_header_is_refused_without_waiting_for_more() {
        for header in [[0u8, 0, 0, 0], [0xff, 0xff, 0xff, 0xff]] {
            let (mut peer, mut ours) = tokio::io::duplex(64);
            peer.write_all(&header).await.unwrap();
            let read = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut ours)).await;
            let Ok(Err(e)) = read else {
                panic!("{header:?}: not refused at once: {read:?}");
            };
            assert!(decode_error(&e).is_some(), "{header:?}: {e}");
            drop(peer);
        }
    }
}
