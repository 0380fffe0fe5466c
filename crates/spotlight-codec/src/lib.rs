//! Feature tensor codecs. The edge encodes the backbone output once; only workers decode.
//! Pure functions, no IO.
//!
//! A tensor on the wire is a codec (how values become bytes), optional per-channel
//! parameters, and an optional lossless stage over the bytes ([`Compression`]). Workers
//! check everything with [`check_payload`] and decode with [`decode_payload`]; the
//! coordinator, which forwards bytes untouched, only bounds the size with [`check_len`].

use serde::{Deserialize, Serialize};

mod compression;
mod per_channel;

pub use compression::Compression;
pub use per_channel::PARAMS_PER_CHANNEL;

/// Largest feature magnitude accepted from the wire. The shipped backbone ends in a tanh,
/// so its outputs lie in [-1, 1] (measured on the 10 000 test images: [-0.9999, 0.9993]);
/// 1e4 leaves a factor of 10 000 for other backbones, and stays far below where the
/// branches overflow f32 (the shipped ones give non-finite logits from about 1e17, see
/// docs/reliability.md). Beyond it a value is corrupt, not a feature.
pub const MAX_ABS_VALUE: f32 = 1.0e4;

/// How feature values are laid out on the wire. Numbers match `spotlight.v1.Codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Little-endian float32: exact.
    #[serde(rename = "f32")]
    F32,
    /// Little-endian float16: half the bytes, ~3 significant digits.
    #[serde(rename = "f16")]
    F16,
    /// One byte per value, affine over the tensor's range: a quarter of the bytes.
    #[serde(rename = "int8")]
    Int8,
    /// One byte per value, affine per channel (float16 offset and step per channel).
    #[serde(rename = "int8_per_channel")]
    Int8PerChannel,
    /// Half a byte per value, affine per channel (float16 offset and step per channel).
    #[serde(rename = "int4_per_channel")]
    Int4PerChannel,
}

impl Codec {
    /// Every codec, in wire order.
    pub const ALL: [Codec; 5] = [
        Codec::F32,
        Codec::F16,
        Codec::Int8,
        Codec::Int8PerChannel,
        Codec::Int4PerChannel,
    ];

    /// The `spotlight.v1.Codec` number.
    pub fn wire(self) -> i32 {
        match self {
            Codec::F32 => 1,
            Codec::F16 => 2,
            Codec::Int8 => 3,
            Codec::Int8PerChannel => 4,
            Codec::Int4PerChannel => 5,
        }
    }

    /// From the `spotlight.v1.Codec` number.
    pub fn from_wire(v: i32) -> Result<Self, CodecError> {
        Codec::ALL
            .into_iter()
            .find(|c| c.wire() == v)
            .ok_or(CodecError::UnknownCodec(v))
    }

    /// Name as written in configs.
    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Int8 => "int8",
            Codec::Int8PerChannel => "int8_per_channel",
            Codec::Int4PerChannel => "int4_per_channel",
        }
    }

    /// Whether the codec carries per-channel parameters (`channel_params`).
    pub fn per_channel(self) -> bool {
        matches!(self, Codec::Int8PerChannel | Codec::Int4PerChannel)
    }

    /// Uncompressed size of `data` for `n` values (per-channel parameters travel apart);
    /// saturates at `usize::MAX`, which no buffer reaches, so a huge `n` fails
    /// [`check_len`] instead of overflowing (a wrapped size could match).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Codec::F32 => n.saturating_mul(4),
            Codec::F16 => n.saturating_mul(2),
            Codec::Int8 | Codec::Int8PerChannel => n,
            Codec::Int4PerChannel => n.div_ceil(2),
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| CodecError::UnknownName(s.to_string()))
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decoding failures.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    /// Codec number not known.
    #[error(
        "unknown codec {0}; expected 1 (f32), 2 (f16), 3 (int8), 4 (int8_per_channel) or 5 (int4_per_channel)"
    )]
    UnknownCodec(i32),
    /// Codec name not known.
    #[error("unknown codec \"{0}\"; expected f32, f16, int8, int8_per_channel or int4_per_channel")]
    UnknownName(String),
    /// Compression number not known.
    #[error("unknown compression {0}; expected 0 (none), 1 (lz4) or 2 (zstd)")]
    UnknownCompression(i32),
    /// Compression name not known.
    #[error("unknown compression \"{0}\"; expected none, lz4 or zstd")]
    UnknownCompressionName(String),
    /// A compressed payload that does not decompress to the codec's size.
    #[error("{compression:?} payload does not decompress to {expected} bytes: {reason}")]
    Decompress {
        compression: Compression,
        expected: usize,
        reason: String,
    },
    /// Per-channel parameters missing or not a whole number of channels.
    #[error(
        "{codec:?} needs {PARAMS_PER_CHANNEL} bytes of channel_params per channel, for a channel count dividing {values} values; got {got} bytes"
    )]
    ChannelParams {
        codec: Codec,
        got: usize,
        values: usize,
    },
    /// Per-channel parameters that are not finite, or decode beyond [`MAX_ABS_VALUE`].
    #[error(
        "channel {channel} has offset {offset} and step {step}; need finite values, a step > 0 and a range within ±{MAX_ABS_VALUE}"
    )]
    BadChannel {
        channel: usize,
        offset: f32,
        step: f32,
    },
    /// Byte count does not fit the shape.
    #[error("feature tensor has {got} bytes; {codec:?} of {values} values needs {expected}")]
    Length {
        codec: Codec,
        values: usize,
        expected: usize,
        got: usize,
    },
    /// Quantisation parameters unusable.
    #[error("int8 scale must be finite and > 0, got {0}")]
    BadScale(f32),
    /// Quantisation zero point not a number or outside the byte range.
    #[error("int8 zero_point must be finite and within [0, 255], got {0}")]
    BadZeroPoint(f32),
    /// Quantisation parameters that decode values beyond [`MAX_ABS_VALUE`].
    #[error(
        "int8 scale {scale} with zero_point {zero_point} decodes values up to {reach}; at most {MAX_ABS_VALUE} allowed"
    )]
    RangeTooWide {
        scale: f32,
        zero_point: f32,
        reach: f32,
    },
    /// A decoded value is NaN or infinite.
    #[error("feature value {index} is {value}; values must be finite")]
    NonFinite { index: usize, value: f32 },
    /// A decoded value beyond [`MAX_ABS_VALUE`].
    #[error("feature value {index} is {value}; values must lie within ±{MAX_ABS_VALUE}")]
    TooLarge { index: usize, value: f32 },
}

/// An encoded tensor: what goes into a `spotlight.v1.FeatureTensor`.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub codec: Codec,
    /// The codec's bytes, after `compression`.
    pub data: Vec<u8>,
    /// Per-tensor quantisation scale (int8 only).
    pub scale: f32,
    /// Per-tensor quantisation zero point (int8 only).
    pub zero_point: f32,
    /// Per-channel float16 `(offset, step)` pairs (per-channel codecs only).
    pub channel_params: Vec<u8>,
    /// Lossless stage applied to `data`.
    pub compression: Compression,
}

/// A tensor as it arrives: borrowed fields of a `spotlight.v1.FeatureTensor`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Payload<'a> {
    pub codec: Codec,
    pub compression: Compression,
    pub data: &'a [u8],
    pub scale: f32,
    pub zero_point: f32,
    pub channel_params: &'a [u8],
}

impl Encoded {
    /// The payload a worker would see.
    pub fn payload(&self) -> Payload<'_> {
        Payload {
            codec: self.codec,
            compression: self.compression,
            data: &self.data,
            scale: self.scale,
            zero_point: self.zero_point,
            channel_params: &self.channel_params,
        }
    }
}

/// Encodes `values` as one channel (see [`encode_channels`]).
pub fn encode(codec: Codec, values: &[f32]) -> Encoded {
    encode_channels(codec, values, 1)
}

/// Encodes `values`, a tensor of `channels` equal contiguous runs (the second axis of
/// `[1, C, H, W]`); per-channel codecs quantise each run on its own range, the others
/// ignore `channels`. A `channels` that does not divide the length means one channel.
pub fn encode_channels(codec: Codec, values: &[f32], channels: usize) -> Encoded {
    let (data, scale, zero_point, channel_params) = match codec {
        Codec::F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            0.0,
            0.0,
            Vec::new(),
        ),
        Codec::F16 => (
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            0.0,
            0.0,
            Vec::new(),
        ),
        Codec::Int8PerChannel | Codec::Int4PerChannel => {
            let (data, params) = per_channel::encode(codec, values, channels);
            (data, 0.0, 0.0, params)
        }
        Codec::Int8 => {
            let (lo, hi) = values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            // Keep 0 inside the range so that zero and constant tensors are exact.
            let (lo, hi) = if lo.is_finite() {
                (lo.min(0.0), hi.max(0.0))
            } else {
                (0.0, 0.0)
            };
            // `decode` refuses a scale that is not finite and > 0, so a range wider than
            // f32::MAX, or so narrow that the step underflows, still gets a usable one.
            let scale = match (hi - lo) / 255.0 {
                _ if hi <= lo => 1.0,
                s if s.is_finite() => s.max(f32::MIN_POSITIVE),
                _ => hi / 255.0 - lo / 255.0,
            };
            let zero_point = (-lo / scale).round();
            let data = values
                .iter()
                .map(|&v| (v / scale + zero_point).round().clamp(0.0, 255.0) as u8)
                .collect();
            (data, scale, zero_point, Vec::new())
        }
    };
    Encoded {
        codec,
        data,
        scale,
        zero_point,
        channel_params,
        compression: Compression::None,
    }
}

/// Applies the lossless stage to an uncompressed `e`. Per frame: where the stage would not
/// make `data` smaller, `e` stays uncompressed (and says so), so a frame never grows.
pub fn compress(mut e: Encoded, compression: Compression) -> Encoded {
    if e.compression == Compression::None
        && let Some(data) = compression::compress(compression, &e.data)
    {
        e.data = data;
        e.compression = compression;
    }
    e
}

/// What the coordinator checks without decoding, and without knowing the lossless stage:
/// that `bytes` is no more than `values` values of `codec` take uncompressed (an entropy
/// stage only ever shrinks a frame: the edge sends it uncompressed otherwise). Workers
/// check the exact length with [`check_payload`].
pub fn check_len(codec: Codec, bytes: usize, values: usize) -> Result<(), CodecError> {
    let expected = codec.encoded_len(values);
    if bytes <= expected {
        Ok(())
    } else {
        Err(length_error(codec, bytes, values))
    }
}

fn length_error(codec: Codec, bytes: usize, values: usize) -> CodecError {
    CodecError::Length {
        codec,
        values,
        expected: codec.encoded_len(values),
        got: bytes,
    }
}

/// The exact uncompressed length.
fn check_exact_len(codec: Codec, bytes: usize, values: usize) -> Result<(), CodecError> {
    if bytes == codec.encoded_len(values) {
        Ok(())
    } else {
        Err(length_error(codec, bytes, values))
    }
}

/// Checks int8 quantisation parameters: a finite scale > 0 and a zero point within the byte
/// range (as the encoder writes them) such that every byte decodes within ±[`MAX_ABS_VALUE`].
pub fn check_int8_params(scale: f32, zero_point: f32) -> Result<(), CodecError> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(CodecError::BadScale(scale));
    }
    if !(0.0..=255.0).contains(&zero_point) {
        return Err(CodecError::BadZeroPoint(zero_point));
    }
    // f64: the reach of absurd parameters must not overflow before it is compared. One
    // step of slack: the encoder rounds the zero point, which can move the reach by a step.
    let reach = f64::from(scale) * f64::from(zero_point.abs().max((255.0 - zero_point).abs()));
    if reach > f64::from(MAX_ABS_VALUE) + f64::from(scale) {
        return Err(CodecError::RangeTooWide {
            scale,
            zero_point,
            reach: reach as f32,
        });
    }
    Ok(())
}

/// Checks, without allocating, that an uncompressed tensor of the right length decodes to
/// finite values within ±[`MAX_ABS_VALUE`]: what the branches can take without
/// overflowing. For the quantised codecs the parameters bound every value, so no byte is
/// read. Per-channel codecs need their parameters: use [`check_payload`].
pub fn check_values(
    codec: Codec,
    data: &[u8],
    scale: f32,
    zero_point: f32,
) -> Result<(), CodecError> {
    check_values_with(codec, data, scale, zero_point, &[], data.len())
}

fn check_values_with(
    codec: Codec,
    data: &[u8],
    scale: f32,
    zero_point: f32,
    channel_params: &[u8],
    values: usize,
) -> Result<(), CodecError> {
    let check = |index: usize, value: f32| {
        if !value.is_finite() {
            Err(CodecError::NonFinite { index, value })
        } else if value.abs() > MAX_ABS_VALUE {
            Err(CodecError::TooLarge { index, value })
        } else {
            Ok(())
        }
    };
    match codec {
        Codec::F32 => data
            .chunks_exact(4)
            .enumerate()
            .try_for_each(|(i, b)| check(i, f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Codec::F16 => data
            .chunks_exact(2)
            .enumerate()
            .try_for_each(|(i, b)| check(i, half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
        Codec::Int8 => check_int8_params(scale, zero_point),
        Codec::Int8PerChannel | Codec::Int4PerChannel => {
            per_channel::params(codec, channel_params, values).map(|_| ())
        }
    }
}

/// Checks everything a worker needs before decoding `values` values: the codec and the
/// stage are known, the (decompressed) length is exact, parameters are finite, and every
/// value decodes finite within ±[`MAX_ABS_VALUE`]. Decompresses into a buffer of the
/// expected size, never more.
pub fn check_payload(p: &Payload<'_>, values: usize) -> Result<(), CodecError> {
    if p.compression == Compression::None {
        check_exact_len(p.codec, p.data.len(), values)?;
        return check_values_with(
            p.codec,
            p.data,
            p.scale,
            p.zero_point,
            p.channel_params,
            values,
        );
    }
    decode_payload(p, values).map(|_| ())
}

/// Decodes `values` values, checking as [`check_payload`] does.
pub fn decode_payload(p: &Payload<'_>, values: usize) -> Result<Vec<f32>, CodecError> {
    let expected = p.codec.encoded_len(values);
    // A compressed frame must still fit the coordinator's bound (and so no huge buffer).
    check_len(p.codec, p.data.len(), values)?;
    let inflated;
    let data = if p.compression == Compression::None {
        p.data
    } else {
        inflated = compression::decompress(p.compression, p.data, expected)?;
        &inflated
    };
    check_exact_len(p.codec, data.len(), values)?;
    let out: Vec<f32> = match p.codec {
        Codec::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Codec::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Codec::Int8 => {
            check_int8_params(p.scale, p.zero_point)?;
            data.iter()
                .map(|&b| p.scale * (f32::from(b) - p.zero_point))
                .collect()
        }
        Codec::Int8PerChannel | Codec::Int4PerChannel => {
            let params = per_channel::params(p.codec, p.channel_params, values)?;
            per_channel::decode(p.codec, data, &params, values)
        }
    };
    if matches!(p.codec, Codec::F32 | Codec::F16) {
        for (index, &value) in out.iter().enumerate() {
            if !value.is_finite() {
                return Err(CodecError::NonFinite { index, value });
            }
            if value.abs() > MAX_ABS_VALUE {
                return Err(CodecError::TooLarge { index, value });
            }
        }
    }
    Ok(out)
}

/// Decodes `values` values of an uncompressed tensor without per-channel parameters
/// (f32, f16, int8). Unlike [`decode_payload`] it does not refuse non-finite or huge
/// f32/f16 values; [`check_values`] does.
pub fn decode(
    codec: Codec,
    data: &[u8],
    scale: f32,
    zero_point: f32,
    values: usize,
) -> Result<Vec<f32>, CodecError> {
    check_exact_len(codec, data.len(), values)?;
    match codec {
        Codec::F32 | Codec::F16 => {
            let width = codec.encoded_len(1);
            Ok(data
                .chunks_exact(width)
                .map(|b| match codec {
                    Codec::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    _ => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                })
                .collect())
        }
        _ => decode_payload(
            &Payload {
                codec,
                compression: Compression::None,
                data,
                scale,
                zero_point,
                channel_params: &[],
            },
            values,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<f32> {
        (0..392).map(|i| ((i as f32) * 0.37).sin()).collect()
    }

    #[test]
    fn f32_round_trips_exactly() {
        let v = sample();
        let e = encode(Codec::F32, &v);
        assert_eq!(e.data.len(), 392 * 4);
        assert_eq!(
            decode(Codec::F32, &e.data, e.scale, e.zero_point, v.len()).unwrap(),
            v
        );
    }

    #[test]
    fn f16_and_int8_stay_within_their_step() {
        let v = sample();
        for (codec, tol) in [(Codec::F16, 1e-3), (Codec::Int8, 2.0 / 255.0)] {
            let e = encode(codec, &v);
            assert_eq!(e.data.len(), codec.encoded_len(v.len()));
            let d = decode(codec, &e.data, e.scale, e.zero_point, v.len()).unwrap();
            let max = v
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max <= tol, "{codec:?}: max error {max} > {tol}");
        }
    }

    #[test]
    fn constant_tensor_survives_int8() {
        let v = vec![0.25f32; 10];
        let e = encode(Codec::Int8, &v);
        let d = decode(Codec::Int8, &e.data, e.scale, e.zero_point, 10).unwrap();
        assert!(d.iter().all(|x| (x - 0.25).abs() < 1e-6), "{d:?}");
    }

    #[test]
    fn int8_of_any_finite_tensor_decodes() {
        // Found by the codec_decode fuzz target (fuzz/): a range wider than f32::MAX made the
        // scale infinite, so workers refused what the edge encoded; a range of a few
        // subnormals made it 0. Beyond ±MAX_ABS_VALUE the worker refuses the range with a
        // clear error instead (the branches would overflow).
        for v in [
            vec![-1.2989704e31, -2.5786997e38, 1.6955964e38, -1.7014135e38],
            vec![f32::MAX, f32::MIN],
        ] {
            let e = encode(Codec::Int8, &v);
            let err = decode(Codec::Int8, &e.data, e.scale, e.zero_point, v.len()).unwrap_err();
            assert!(
                matches!(err, CodecError::RangeTooWide { .. }),
                "{v:?}: {err}"
            );
        }
        for v in [
            vec![0.0, 1e-45],
            vec![-1e-45, 3e-45],
            vec![-MAX_ABS_VALUE, MAX_ABS_VALUE],
        ] {
            let e = encode(Codec::Int8, &v);
            let d = decode(Codec::Int8, &e.data, e.scale, e.zero_point, v.len());
            let d = d.unwrap_or_else(|err| panic!("{v:?}: {err}"));
            for (a, b) in v.iter().zip(&d) {
                assert!(b.is_finite(), "{v:?} decoded to {d:?}");
                assert!((a - b).abs() <= e.scale * 1.01, "{v:?} decoded to {d:?}");
            }
        }
    }

    #[test]
    fn wrong_length_is_an_error_that_says_what_was_expected() {
        let err = decode(Codec::F32, &[0; 7], 0.0, 0.0, 2).unwrap_err();
        assert_eq!(
            err,
            CodecError::Length {
                codec: Codec::F32,
                values: 2,
                expected: 8,
                got: 7
            }
        );
        assert_eq!(
            err.to_string(),
            "feature tensor has 7 bytes; F32 of 2 values needs 8"
        );
    }

    #[test]
    fn huge_value_counts_are_a_length_error_not_an_overflow() {
        // Found by the codec_decode fuzz target (fuzz/): 4 * n overflowed and panicked; in a
        // release build it wraps, and 2^62 f32 values "fit" in an empty payload.
        let n = 5_765_460_774_122_160_128;
        assert_eq!(
            decode(Codec::F32, &[], 0.0, 9.62965e-35, n),
            Err(CodecError::Length {
                codec: Codec::F32,
                values: n,
                expected: usize::MAX,
                got: 0
            })
        );
        for codec in [Codec::F32, Codec::F16] {
            // check_len is the coordinator's upper bound; the exact check is the worker's.
            assert!(check_len(codec, usize::MAX, 1 << 60).is_err());
            for compression in Compression::ALL {
                for n in [1 << 62, usize::MAX] {
                    let p = Payload {
                        codec,
                        compression,
                        data: &[1, 2, 3],
                        scale: 0.0,
                        zero_point: 0.0,
                        channel_params: &[],
                    };
                    // An error, and no buffer of the claimed size.
                    assert!(check_payload(&p, n).is_err());
                }
            }
        }
    }

    #[test]
    fn unknown_codec_numbers_are_rejected() {
        assert_eq!(Codec::from_wire(0), Err(CodecError::UnknownCodec(0)));
        for c in [Codec::F32, Codec::F16, Codec::Int8] {
            assert_eq!(Codec::from_wire(c.wire()), Ok(c));
        }
    }

    #[test]
    fn encoded_backbone_outputs_pass_the_value_check() {
        let v = sample();
        for codec in [Codec::F32, Codec::F16, Codec::Int8] {
            let e = encode(codec, &v);
            assert_eq!(check_values(codec, &e.data, e.scale, e.zero_point), Ok(()));
        }
        let edge = encode(Codec::F32, &[MAX_ABS_VALUE, -MAX_ABS_VALUE]);
        assert_eq!(check_values(Codec::F32, &edge.data, 0.0, 0.0), Ok(()));
    }

    #[test]
    fn non_finite_and_huge_values_are_refused_naming_the_first() {
        for (codec, value, err) in [
            (
                Codec::F32,
                f32::NAN,
                "feature value 2 is NaN; values must be finite",
            ),
            (
                Codec::F32,
                f32::INFINITY,
                "feature value 2 is inf; values must be finite",
            ),
            (
                Codec::F32,
                1e30,
                "feature value 2 is 1000000000000000000000000000000; values must lie within ±10000",
            ),
            (
                Codec::F16,
                f32::NEG_INFINITY,
                "feature value 2 is -inf; values must be finite",
            ),
            (
                Codec::F16,
                60000.0,
                "feature value 2 is 60000; values must lie within ±10000",
            ),
        ] {
            let e = encode(codec, &[0.5, -0.5, value, 0.0]);
            let got = check_values(codec, &e.data, 0.0, 0.0).map_err(|e| e.to_string());
            assert_eq!(got, Err(err.to_string()), "{codec:?} {value}");
        }
    }

    #[test]
    fn int8_parameters_must_be_finite_and_keep_values_in_range() {
        let data = [0u8, 128, 255];
        for (scale, zero_point, err) in [
            (
                f32::NAN,
                128.0,
                "int8 scale must be finite and > 0, got NaN",
            ),
            (0.0, 128.0, "int8 scale must be finite and > 0, got 0"),
            (
                0.01,
                f32::NAN,
                "int8 zero_point must be finite and within [0, 255], got NaN",
            ),
            (
                1e30,
                128.0,
                "int8 scale 1000000000000000000000000000000 with zero_point 128 decodes values up to 128000000000000000000000000000000; at most 10000 allowed",
            ),
            (
                1.0,
                -1e6,
                "int8 zero_point must be finite and within [0, 255], got -1000000",
            ),
            (
                0.01,
                255.5,
                "int8 zero_point must be finite and within [0, 255], got 255.5",
            ),
            (
                100.0,
                0.0,
                "int8 scale 100 with zero_point 0 decodes values up to 25500; at most 10000 allowed",
            ),
        ] {
            let got =
                check_values(Codec::Int8, &data, scale, zero_point).map_err(|e| e.to_string());
            assert_eq!(got, Err(err.to_string()), "{scale} {zero_point}");
            assert!(decode(Codec::Int8, &data, scale, zero_point, 3).is_err());
        }
        // The widest range an int8 tensor within ±1e4 needs, as the encoder writes it.
        let e = encode(Codec::Int8, &[-MAX_ABS_VALUE, 0.0, MAX_ABS_VALUE]);
        assert_eq!(
            check_values(Codec::Int8, &e.data, e.scale, e.zero_point),
            Ok(())
        );
    }

    #[test]
    fn per_channel_codecs_have_their_sizes_and_names() {
        let v = sample();
        for (codec, bytes) in [(Codec::Int8PerChannel, 392), (Codec::Int4PerChannel, 196)] {
            let e = encode_channels(codec, &v, 8);
            assert_eq!(e.data.len(), bytes);
            assert_eq!(e.channel_params.len(), 8 * PARAMS_PER_CHANNEL);
            assert_eq!(codec.name().parse::<Codec>(), Ok(codec));
            assert_eq!(Codec::from_wire(codec.wire()), Ok(codec));
        }
        assert_eq!(
            "int2".parse::<Codec>().map_err(|e| e.to_string()),
            Err("unknown codec \"int2\"; expected f32, f16, int8, int8_per_channel or int4_per_channel".into())
        );
    }

    #[test]
    fn malformed_per_channel_payloads_are_errors() {
        let v = sample();
        let e = encode_channels(Codec::Int4PerChannel, &v, 8);
        let good = e.payload();
        assert!(check_payload(&good, 392).is_ok());
        let nan = half::f16::NAN.to_le_bytes();
        let mut bad_params = e.channel_params.clone();
        bad_params[4..6].copy_from_slice(&nan);
        let huge = half::f16::from_f32(60000.0).to_le_bytes();
        let mut wide = e.channel_params.clone();
        wide[2..4].copy_from_slice(&huge);
        let mut zero_step = e.channel_params.clone();
        zero_step[2..4].copy_from_slice(&[0, 0]);
        for (p, err) in [
            (
                Payload {
                    channel_params: &[],
                    ..good
                },
                "needs 4 bytes of channel_params per channel",
            ),
            (
                Payload {
                    channel_params: &e.channel_params[..7],
                    ..good
                },
                "got 7 bytes",
            ),
            // 3 channels do not divide 392 values.
            (
                Payload {
                    channel_params: &e.channel_params[..12],
                    ..good
                },
                "got 12 bytes",
            ),
            (
                Payload {
                    channel_params: &bad_params,
                    ..good
                },
                "channel 1 has offset NaN",
            ),
            (
                Payload {
                    channel_params: &wide,
                    ..good
                },
                "channel 0 has offset",
            ),
            (
                Payload {
                    channel_params: &zero_step,
                    ..good
                },
                "and step 0",
            ),
            (
                Payload {
                    data: &e.data[..195],
                    ..good
                },
                "has 195 bytes",
            ),
            (
                Payload {
                    compression: Compression::Lz4,
                    ..good
                },
                "not fewer than",
            ),
            (
                Payload {
                    compression: Compression::Zstd,
                    data: &[1, 2, 3],
                    ..good
                },
                "Zstd payload does not decompress to 196 bytes",
            ),
            (
                Payload {
                    compression: Compression::Lz4,
                    data: &[0xf0, 0xff, 0xff, 0xff],
                    ..good
                },
                "Lz4 payload does not decompress",
            ),
        ] {
            let got = check_payload(&p, 392).map_err(|e| e.to_string());
            assert!(
                matches!(&got, Err(m) if m.contains(err)),
                "{got:?} lacks {err}"
            );
            assert!(decode_payload(&p, 392).is_err());
        }
        assert_eq!(
            Compression::from_wire(3),
            Err(CodecError::UnknownCompression(3))
        );
    }

    #[test]
    fn compression_never_grows_a_frame_and_decompresses_exactly() {
        // Zeros compress; backbone-like noise does not, and stays uncompressed.
        let zeros = vec![0.0f32; 392];
        for compression in [Compression::Lz4, Compression::Zstd] {
            let e = compress(encode(Codec::F32, &zeros), compression);
            assert_eq!(e.compression, compression);
            assert!(e.data.len() < 1568);
            assert_eq!(decode_payload(&e.payload(), 392), Ok(zeros.clone()));
            // A payload that inflates beyond the expected size is refused, not allocated.
            assert!(decode_payload(&e.payload(), 100).is_err());
            let noise = encode_channels(Codec::Int4PerChannel, &sample(), 8);
            let c = compress(noise.clone(), compression);
            assert!(c.data.len() <= noise.data.len());
            assert_eq!(
                decode_payload(&c.payload(), 392),
                decode_payload(&noise.payload(), 392)
            );
        }
        // The coordinator's bound: never more than the uncompressed size.
        assert!(check_len(Codec::F32, 10, 392).is_ok());
        assert!(check_len(Codec::F32, 1569, 392).is_err());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn tensor() -> impl Strategy<Value = (Vec<f32>, usize)> {
            (1usize..=8, 1usize..=60, -100.0f32..100.0, 0.0f32..50.0).prop_flat_map(
                |(channels, per, center, spread)| {
                    (
                        proptest::collection::vec(
                            center - spread..=center + spread,
                            channels * per,
                        ),
                        Just(channels),
                    )
                },
            )
        }

        fn max_step(e: &Encoded) -> f32 {
            e.channel_params
                .chunks_exact(4)
                .map(|p| half::f16::from_le_bytes([p[2], p[3]]).to_f32())
                .fold(0.0, f32::max)
        }

        proptest! {
            #[test]
            fn per_channel_round_trips_within_half_a_step(
                (v, channels) in tensor(),
                int4 in any::<bool>(),
                compression in prop::sample::select(Compression::ALL.to_vec()),
            ) {
                let codec = if int4 { Codec::Int4PerChannel } else { Codec::Int8PerChannel };
                let e = compress(encode_channels(codec, &v, channels), compression);
                let d = decode_payload(&e.payload(), v.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let per = v.len() / channels;
                for (c, p) in e.channel_params.chunks_exact(4).enumerate() {
                    let step = half::f16::from_le_bytes([p[2], p[3]]).to_f32();
                    for i in c * per..(c + 1) * per {
                        let err = (v[i] - d[i]).abs();
                        // Half a step, plus f32 rounding at the value's magnitude.
                        let tol = step * 0.5 + v[i].abs().max(1.0) * 4.0 * f32::EPSILON;
                        prop_assert!(err <= tol, "{codec:?} value {} decoded to {} (step {step})", v[i], d[i]);
                    }
                }
                // The step is as fine as the range allows: range / qmax, rounded up to f16.
                let range = v.iter().fold(f32::MIN, |a, &b| a.max(b)) - v.iter().fold(f32::MAX, |a, &b| a.min(b));
                let qmax = if int4 { 15.0 } else { 255.0 };
                prop_assert!(max_step(&e) <= (range / qmax) * 1.01 + 0.1, "step {} for range {range}", max_step(&e));
            }

            #[test]
            fn per_tensor_codecs_round_trip_within_their_bounds(
                (v, _) in tensor(),
                compression in prop::sample::select(Compression::ALL.to_vec()),
            ) {
                for codec in [Codec::F32, Codec::F16, Codec::Int8] {
                    let e = compress(encode(codec, &v), compression);
                    let d = decode_payload(&e.payload(), v.len()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    for (a, b) in v.iter().zip(&d) {
                        let tol = match codec {
                            Codec::F32 => 0.0,
                            // f16: relative 2^-11, or the subnormal spacing near 0.
                            Codec::F16 => a.abs() * 4.9e-4 + 6e-8,
                            _ => e.scale * 1.01,
                        };
                        prop_assert!((a - b).abs() <= tol, "{codec:?}: {a} decoded to {b}");
                    }
                }
            }

            #[test]
            fn arbitrary_payloads_give_an_error_or_the_asked_length(
                codec in prop::sample::select(Codec::ALL.to_vec()),
                compression in 0i32..4,
                data in proptest::collection::vec(any::<u8>(), 0..1600),
                params in proptest::collection::vec(any::<u8>(), 0..40),
                scale in any::<f32>(),
                zero_point in any::<f32>(),
                values in 0usize..800,
            ) {
                let Ok(compression) = Compression::from_wire(compression) else { return Ok(()) };
                let p = Payload { codec, compression, data: &data, scale, zero_point, channel_params: &params };
                let checked = check_payload(&p, values);
                match decode_payload(&p, values) {
                    Ok(out) => {
                        prop_assert!(checked.is_ok());
                        prop_assert_eq!(out.len(), values);
                        prop_assert!(out.iter().all(|v| v.is_finite() && v.abs() <= MAX_ABS_VALUE * 1.01 + 2000.0));
                    }
                    Err(_) => prop_assert!(checked.is_err()),
                }
            }
        }
    }
}
