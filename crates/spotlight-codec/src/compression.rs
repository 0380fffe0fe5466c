//! The optional lossless stage after a codec: LZ4 (block format) or zstd over `data`.
//! Decompression writes into a buffer of exactly the size the codec expects, so a payload
//! that inflates beyond it is an error, never an allocation (no decompression bombs).

use serde::{Deserialize, Serialize};

use crate::CodecError;

/// zstd level the edge compresses with: payloads are a few hundred bytes, so even the
/// strongest levels cost microseconds.
const ZSTD_LEVEL: i32 = 19;

/// Largest size a payload inflates to: the 64 MiB message limit of every role.
pub const MAX_DECOMPRESSED_BYTES: usize = 64 << 20;

/// Lossless stage applied to a tensor's `data` after its codec. Numbers match
/// `spotlight.v1.Compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `data` is the codec's output as is.
    #[default]
    None,
    /// LZ4 block format, no size prefix (the codec fixes the size).
    Lz4,
    /// A zstd frame.
    Zstd,
}

impl Compression {
    /// Every stage, in wire order.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    /// The `spotlight.v1.Compression` number.
    pub fn wire(self) -> i32 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }

    /// From the `spotlight.v1.Compression` number.
    pub fn from_wire(v: i32) -> Result<Self, CodecError> {
        match v {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Lz4),
            2 => Ok(Compression::Zstd),
            other => Err(CodecError::UnknownCompression(other)),
        }
    }

    /// Name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| CodecError::UnknownCompressionName(s.to_string()))
    }
}

/// Compresses `data`; `None` when the stage cannot make it smaller (the caller then sends
/// it uncompressed).
pub(crate) fn compress(compression: Compression, data: &[u8]) -> Option<Vec<u8>> {
    let out = match compression {
        Compression::None => return None,
        Compression::Lz4 => lz4_flex::block::compress(data),
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL).ok()?,
    };
    (out.len() < data.len()).then_some(out)
}

/// Undoes `compression` into exactly `expected` bytes; anything else is an error.
pub(crate) fn decompress(
    compression: Compression,
    data: &[u8],
    expected: usize,
) -> Result<Vec<u8>, CodecError> {
    if compression == Compression::None {
        return Ok(data.to_vec());
    }
    let fail = |reason: String| CodecError::Decompress {
        compression,
        expected,
        reason,
    };
    // No feature tensor is larger than the biggest message a role accepts.
    if expected > MAX_DECOMPRESSED_BYTES {
        return Err(fail(format!(
            "the codec's size is over the {MAX_DECOMPRESSED_BYTES}-byte limit"
        )));
    }
    // A compressed payload is never larger than what it stands for: the edge sends the
    // uncompressed form instead. This also bounds the work before the buffer exists.
    if data.len() >= expected {
        return Err(fail(format!(
            "{} compressed bytes are not fewer than the uncompressed size",
            data.len()
        )));
    }
    let mut out = vec![0u8; expected];
    let n = match compression {
        Compression::None => data.len(),
        Compression::Lz4 => {
            lz4_flex::block::decompress_into(data, &mut out).map_err(|e| fail(e.to_string()))?
        }
        Compression::Zstd => zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(data, &mut out[..]))
            .map_err(|e| fail(e.to_string()))?,
    };
    if n != expected {
        return Err(fail(format!("it holds {n} bytes")));
    }
    Ok(out)
}
