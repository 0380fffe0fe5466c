//! Per-channel affine quantisation (int8 and int4). Each channel `c` (a contiguous run of
//! `values / channels` values; the feature tensor's second axis) gets its own `offset` and
//! `step`, sent as little-endian float16 pairs in `channel_params`:
//! `value = offset + step * q`, `q` in `0..=qmax` (255 for int8, 15 for int4).
//!
//! The encoder rounds `offset` down and `step` up in float16, so the channel's range always
//! fits and every value decodes within half a step (plus float rounding) of the original.
//! Int4 packs two values per byte, the first in the low nibble.

use half::f16;

use crate::{Codec, CodecError, MAX_ABS_VALUE};

/// Bytes of parameters per channel: float16 offset, float16 step.
pub const PARAMS_PER_CHANNEL: usize = 4;

/// Largest quantised value of a per-channel codec.
pub(crate) fn qmax(codec: Codec) -> u8 {
    match codec {
        Codec::Int4PerChannel => 15,
        _ => 255,
    }
}

/// The next float16 towards −∞ (finite input).
fn next_down(h: f16) -> f16 {
    let bits = h.to_bits();
    if bits == 0 {
        f16::from_bits(0x8001)
    } else if bits & 0x8000 != 0 {
        f16::from_bits(bits + 1)
    } else {
        f16::from_bits(bits - 1)
    }
}

/// The next float16 towards +∞ (finite, non-negative input).
fn next_up(h: f16) -> f16 {
    f16::from_bits(h.to_bits() + 1)
}

/// Float16 at or below `x`.
fn f16_floor(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x { next_down(h) } else { h }
}

/// Float16 at or above `x` (x ≥ 0), and above zero.
fn f16_ceil_positive(x: f32) -> f16 {
    let h = f16::from_f32(x);
    let h = if h.to_f32() < x { next_up(h) } else { h };
    if h.to_f32() > 0.0 {
        h
    } else {
        f16::from_bits(1)
    }
}

/// Encodes `values` as `channels` equal runs; `channels` must divide `values.len()` (else
/// one channel). Values are saturated to ±[`MAX_ABS_VALUE`]; NaN encodes as the offset.
pub(crate) fn encode(codec: Codec, values: &[f32], channels: usize) -> (Vec<u8>, Vec<u8>) {
    let channels = if channels > 0 && values.len().is_multiple_of(channels) && !values.is_empty() {
        channels
    } else {
        1
    };
    let per = values.len() / channels;
    let qmax = qmax(codec);
    let mut params = Vec::with_capacity(channels * PARAMS_PER_CHANNEL);
    let mut q = Vec::with_capacity(values.len());
    for c in 0..channels {
        let run = &values[c * per..(c + 1) * per];
        let clamp = |v: f32| v.clamp(-MAX_ABS_VALUE, MAX_ABS_VALUE);
        let (lo, hi) = run
            .iter()
            .filter(|v| !v.is_nan())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(clamp(v)), hi.max(clamp(v)))
            });
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
        let offset = f16_floor(lo);
        let step = f16_ceil_positive((hi - offset.to_f32()) / f32::from(qmax));
        params.extend_from_slice(&offset.to_le_bytes());
        params.extend_from_slice(&step.to_le_bytes());
        let (o, s) = (offset.to_f32(), step.to_f32());
        q.extend(run.iter().map(|&v| {
            let x = ((clamp(v) - o) / s).round();
            if x.is_nan() {
                0
            } else {
                x.clamp(0.0, f32::from(qmax)) as u8
            }
        }));
    }
    let data = match codec {
        Codec::Int4PerChannel => q
            .chunks(2)
            .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
            .collect(),
        _ => q,
    };
    (data, params)
}

/// Parsed per-channel parameters: `(offset, step)` per channel, each checked.
pub(crate) fn params(
    codec: Codec,
    params: &[u8],
    values: usize,
) -> Result<Vec<(f32, f32)>, CodecError> {
    let channels = params.len() / PARAMS_PER_CHANNEL;
    if !params.len().is_multiple_of(PARAMS_PER_CHANNEL)
        || channels == 0
        || !values.is_multiple_of(channels)
    {
        return Err(CodecError::ChannelParams {
            codec,
            got: params.len(),
            values,
        });
    }
    let qmax = f64::from(qmax(codec));
    params
        .chunks_exact(PARAMS_PER_CHANNEL)
        .enumerate()
        .map(|(channel, p)| {
            let offset = f16::from_le_bytes([p[0], p[1]]).to_f32();
            let step = f16::from_le_bytes([p[2], p[3]]).to_f32();
            let bad = || CodecError::BadChannel {
                channel,
                offset,
                step,
            };
            if !offset.is_finite() || !step.is_finite() || step <= 0.0 {
                return Err(bad());
            }
            // The encoder rounds the range outwards to float16 (spacing 8 near 1e4), so
            // allow that much, and a step, beyond ±MAX_ABS_VALUE.
            let (o, s) = (f64::from(offset), f64::from(step));
            let limit = f64::from(MAX_ABS_VALUE) * (1.0 + 1.0 / 1024.0) + s;
            if o.abs() > limit || (o + s * qmax).abs() > limit {
                return Err(bad());
            }
            Ok((offset, step))
        })
        .collect()
}

/// Decodes `values` values from `data` of exactly the codec's length and checked `params`.
pub(crate) fn decode(codec: Codec, data: &[u8], params: &[(f32, f32)], values: usize) -> Vec<f32> {
    let per = values / params.len();
    let q = |i: usize| match codec {
        Codec::Int4PerChannel => (data[i / 2] >> ((i % 2) * 4)) & 0x0f,
        _ => data[i],
    };
    (0..values)
        .map(|i| {
            let (o, s) = params[i / per];
            o + s * f32::from(q(i))
        })
        .collect()
}
