//! Framing and encoding.
//!
//! ```text
//! frame   = length: u32 big-endian | version: u8 | payload: postcard bytes
//! length  = 1 + len(payload), at most the decoder's limit (never more than MAX_FRAME_LEN)
//! ```
//!
//! The length is checked against the limit before anything is allocated or read further; the
//! payload must decode to exactly one value with no trailing bytes. Decoding is pure: it works
//! on byte slices, and [`FrameDecoder::decode`] reports `Ok(None)` when more bytes are needed,
//! so the node's socket code stays a thin loop around it.
//!
//! postcard caps how much a length prefix can make it preallocate, and every element of a
//! sequence consumes input bytes, so a frame of `n` bytes can only make the decoder allocate in
//! proportion to `n` (a test with a counting allocator checks this).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::PROTOCOL_VERSION;

/// The largest frame drift accepts anywhere (header excluded): a 1 MiB page batch plus its
/// page table fits with room to spare.
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;

/// Bytes before the payload: the length (4) and the version (1).
pub const HEADER_LEN: usize = 5;

/// What was wrong with bytes that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame has length 0 (no version byte)")]
    Empty,
    #[error("unsupported protocol version {0} (this node speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("frame truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("{0} trailing byte(s) after the value")]
    TrailingBytes(usize),
    #[error("payload is not in canonical form")]
    NotCanonical,
    #[error("payload does not decode: {0}")]
    Malformed(postcard::Error),
}

impl DecodeError {
    /// A stable, short label for counters and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Empty => "empty",
            DecodeError::Version(_) => "bad_version",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::NotCanonical => "not_canonical",
            DecodeError::Malformed(_) => "undecodable",
        }
    }
}

/// Judges a frame's 4-byte length before its version byte arrives: an empty or oversized
/// frame is refused from the length alone.
pub fn check_length(len: [u8; 4], max: usize) -> Result<(), DecodeError> {
    let len = u32::from_be_bytes(len) as usize;
    let max = max.min(MAX_FRAME_LEN);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    Ok(())
}

/// Encodes `value` as a bare postcard payload (no frame header).
pub fn encode_payload<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // postcard only fails for serde features drift's types do not use (unknown-length
    // sequences, custom errors), so a failure here is a bug in a type definition.
    postcard::to_stdvec(value).expect("drift types always encode")
}

/// Decodes a bare payload, which must be consumed exactly and be the canonical encoding of
/// the value (postcard accepts overlong varints and unsorted maps; drift does not, so every
/// value has exactly one encoding on the wire).
pub fn decode_payload<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    if !is_canonical(&value, bytes) {
        return Err(DecodeError::NotCanonical);
    }
    Ok(value)
}

/// Whether `bytes` is exactly the encoding of `value`, compared without allocating.
fn is_canonical<T: Serialize>(value: &T, bytes: &[u8]) -> bool {
    struct Compare<'a> {
        expected: &'a [u8],
        same: bool,
    }
    impl postcard::ser_flavors::Flavor for Compare<'_> {
        type Output = bool;
        fn try_push(&mut self, data: u8) -> postcard::Result<()> {
            self.try_extend(&[data])
        }
        fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
            match self.expected.split_at_checked(data.len()) {
                Some((head, rest)) if head == data => self.expected = rest,
                _ => {
                    self.same = false;
                    self.expected = &[];
                }
            }
            Ok(())
        }
        fn finalize(self) -> postcard::Result<bool> {
            Ok(self.same && self.expected.is_empty())
        }
    }
    postcard::serialize_with_flavor(
        value,
        Compare {
            expected: bytes,
            same: true,
        },
    )
    .unwrap_or(false)
}

/// Appends one frame holding `value` to `out`.
pub fn encode_frame_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION]);
    let out_vec = std::mem::take(out);
    *out = postcard::to_extend(value, out_vec).expect("drift types always encode");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// One frame holding `value`.
pub fn encode_frame<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_into(value, &mut out);
    out
}

/// Parses a frame header and returns the payload length, checked against `max`. For readers
/// that pull the header off a socket and then read exactly the payload.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, DecodeError> {
    let len_bytes = [header[0], header[1], header[2], header[3]];
    check_length(len_bytes, max)?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if header[4] != PROTOCOL_VERSION {
        return Err(DecodeError::Version(header[4]));
    }
    Ok(len - 1)
}

/// Decodes frames with a size limit.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_len` (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// The limit in force.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Decodes the first frame of `buf`. `Ok(None)`: not enough bytes yet. `Ok(Some((v, n)))`:
    /// a value and the bytes it used. Errors are final for the stream.
    pub fn decode<T: DeserializeOwned + Serialize>(
        &self,
        buf: &[u8],
    ) -> Result<Option<(T, usize)>, DecodeError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            // The length alone can already be judged.
            if let Some(len) = buf.get(..4) {
                check_length([len[0], len[1], len[2], len[3]], self.max_len)?;
            }
            return Ok(None);
        };
        let header: [u8; HEADER_LEN] = header.try_into().expect("slice of HEADER_LEN");
        let payload_len = parse_header(header, self.max_len)?;
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + payload_len) else {
            return Ok(None);
        };
        let value = decode_payload(payload)?;
        Ok(Some((value, HEADER_LEN + payload_len)))
    }

    /// Decodes a buffer that must be exactly one whole frame (a gossip message, a file).
    pub fn decode_exact<T: DeserializeOwned + Serialize>(
        &self,
        buf: &[u8],
    ) -> Result<T, DecodeError> {
        match self.decode(buf)? {
            Some((value, used)) if used == buf.len() => Ok(value),
            Some((_, used)) => Err(DecodeError::TrailingBytes(buf.len() - used)),
            None => {
                let need = match buf.get(..4) {
                    Some(l) => 4 + u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize,
                    None => HEADER_LEN,
                };
                Err(DecodeError::Truncated {
                    need,
                    have: buf.len(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_incremental() {
        let value = (7u32, String::from("drift"), vec![1u8, 2, 3]);
        let frame = encode_frame(&value);
        let dec = FrameDecoder::default();
        for cut in 0..frame.len() {
            assert_eq!(
                dec.decode::<(u32, String, Vec<u8>)>(&frame[..cut]),
                Ok(None)
            );
        }
        let (back, used) = dec
            .decode::<(u32, String, Vec<u8>)>(&frame)
            .unwrap()
            .unwrap();
        assert_eq!((back, used), (value.clone(), frame.len()));
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert_eq!(
            dec.decode_exact::<(u32, String, Vec<u8>)>(&two),
            Err(DecodeError::TrailingBytes(frame.len()))
        );
    }

    #[test]
    fn rejects_before_allocating() {
        let dec = FrameDecoder::new(100);
        let huge = [0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            dec.decode::<Vec<u8>>(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(
            dec.decode::<u8>(&[0, 0, 0, 2, 9, 1]),
            Err(DecodeError::Version(9))
        );
        assert_eq!(dec.decode::<u8>(&[0, 0, 0, 0, 1]), Err(DecodeError::Empty));
        // A value followed by junk inside the frame.
        assert_eq!(
            dec.decode::<u8>(&[0, 0, 0, 3, 1, 5, 6]),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            dec.decode_exact::<u8>(&[0, 0, 0, 3, 1]),
            Err(DecodeError::Truncated { need: 7, have: 5 })
        );
    }
}
