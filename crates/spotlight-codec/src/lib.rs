//! Feature tensor codecs. The edge encodes the backbone output once; only workers decode.
//! Pure functions, no IO.

use serde::{Deserialize, Serialize};

/// Largest feature magnitude accepted from the wire. The shipped backbone ends in a tanh,
/// so its outputs lie in [-1, 1] (measured on the 10 000 test images: [-0.9999, 0.9993]);
/// 1e4 leaves a factor of 10 000 for other backbones, and stays far below where the
/// branches overflow f32 (the shipped ones give non-finite logits from about 1e17, see
/// docs/reliability.md). Beyond it a value is corrupt, not a feature.
pub const MAX_ABS_VALUE: f32 = 1.0e4;

/// How feature values are laid out on the wire. Numbers match `spotlight.v1.Codec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Little-endian float32: exact.
    F32,
    /// Little-endian float16: half the bytes, ~3 significant digits.
    F16,
    /// One byte per value, affine over the tensor's range: a quarter of the bytes.
    Int8,
}

impl Codec {
    /// The `spotlight.v1.Codec` number.
    pub fn wire(self) -> i32 {
        match self {
            Codec::F32 => 1,
            Codec::F16 => 2,
            Codec::Int8 => 3,
        }
    }

    /// From the `spotlight.v1.Codec` number.
    pub fn from_wire(v: i32) -> Result<Self, CodecError> {
        match v {
            1 => Ok(Codec::F32),
            2 => Ok(Codec::F16),
            3 => Ok(Codec::Int8),
            other => Err(CodecError::UnknownCodec(other)),
        }
    }

    /// Encoded size of `n` values; saturates at `usize::MAX`, which no buffer reaches, so a
    /// huge `n` fails [`check_len`] instead of overflowing (a wrapped size could match).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Codec::F32 => n.saturating_mul(4),
            Codec::F16 => n.saturating_mul(2),
            Codec::Int8 => n,
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Codec::F32),
            "f16" => Ok(Codec::F16),
            "int8" => Ok(Codec::Int8),
            other => Err(CodecError::UnknownName(other.to_string())),
        }
    }
}

/// Decoding failures.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    /// Codec number not known.
    #[error("unknown codec {0}; expected 1 (f32), 2 (f16) or 3 (int8)")]
    UnknownCodec(i32),
    /// Codec name not known.
    #[error("unknown codec \"{0}\"; expected f32, f16 or int8")]
    UnknownName(String),
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

/// An encoded tensor's payload and quantisation parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub codec: Codec,
    pub data: Vec<u8>,
    pub scale: f32,
    pub zero_point: f32,
}

/// Encodes `values`.
pub fn encode(codec: Codec, values: &[f32]) -> Encoded {
    let (data, scale, zero_point) = match codec {
        Codec::F32 => (
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            0.0,
            0.0,
        ),
        Codec::F16 => (
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            0.0,
            0.0,
        ),
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
            (data, scale, zero_point)
        }
    };
    Encoded {
        codec,
        data,
        scale,
        zero_point,
    }
}

/// Checks that `bytes` bytes can hold `values` values in `codec`, without decoding.
pub fn check_len(codec: Codec, bytes: usize, values: usize) -> Result<(), CodecError> {
    let expected = codec.encoded_len(values);
    if bytes == expected {
        Ok(())
    } else {
        Err(CodecError::Length {
            codec,
            values,
            expected,
            got: bytes,
        })
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

/// Checks, without allocating, that a tensor of the right length (see [`check_len`])
/// decodes to finite values within ±[`MAX_ABS_VALUE`]: what the branches can take
/// without overflowing. For int8 the parameters bound every value, so no byte is read.
pub fn check_values(
    codec: Codec,
    data: &[u8],
    scale: f32,
    zero_point: f32,
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
    }
}

/// Decodes `values` values.
pub fn decode(
    codec: Codec,
    data: &[u8],
    scale: f32,
    zero_point: f32,
    values: usize,
) -> Result<Vec<f32>, CodecError> {
    check_len(codec, data.len(), values)?;
    Ok(match codec {
        Codec::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Codec::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Codec::Int8 => {
            check_int8_params(scale, zero_point)?;
            data.iter()
                .map(|&b| scale * (f32::from(b) - zero_point))
                .collect()
        }
    })
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
            assert!(check_len(codec, 0, 1 << 62).is_err());
            assert!(check_len(codec, 0, usize::MAX).is_err());
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
}
