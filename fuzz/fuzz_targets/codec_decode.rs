//! `spotlight_codec::check_len` / `decode` on any codec number, value count, scale, zero point
//! and payload: an error or a tensor of exactly the asked length, never a panic; and the
//! round trips each codec promises. Then what workers run on every frame,
//! `check_payload` / `decode_payload`, on any compression number, per-channel parameters
//! and (compressed) payload: an error, or finite values of the asked length within range.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spotlight_codec::{
    Codec, CodecError, Compression, Payload, check_len, check_payload, compress, decode,
    decode_payload, encode, encode_channels,
};

#[derive(Debug, Arbitrary)]
struct Input {
    /// `spotlight.v1.Codec` number as it comes off the wire.
    codec: i32,
    /// Value count the caller expects (what a tensor's shape multiplies out to).
    values: usize,
    /// Take the value count from the payload length instead, so that most inputs decode.
    values_from_len: bool,
    scale: f32,
    zero_point: f32,
    data: Vec<u8>,
    /// `spotlight.v1.Compression` number as it comes off the wire.
    compression: i32,
    /// Per-channel parameters as they come off the wire.
    channel_params: Vec<u8>,
    /// Channel count the edge would encode with.
    channels: u8,
}

fuzz_target!(|input: Input| {
    let Input {
        codec,
        values,
        values_from_len,
        scale,
        zero_point,
        data,
        compression,
        channel_params,
        channels,
    } = input;
    let codec = match Codec::from_wire(codec) {
        Ok(c) => {
            assert_eq!(c.wire(), codec);
            c
        }
        Err(e) => {
            assert_eq!(e, CodecError::UnknownCodec(codec));
            return;
        }
    };
    payload_path(
        codec,
        compression,
        &data,
        scale,
        zero_point,
        &channel_params,
        values,
        values_from_len,
        channels,
    );
    if codec.per_channel() {
        return;
    }
    let width = codec.encoded_len(1);
    let values = if values_from_len {
        data.len() / width
    } else {
        values
    };

    let checked = check_len(codec, data.len(), values);
    let decoded = decode(codec, &data, scale, zero_point, values);
    match &decoded {
        Ok(out) => {
            assert!(checked.is_ok(), "decode accepted what check_len refused");
            assert_eq!(
                out.len(),
                values,
                "decode returned a tensor of the wrong length"
            );
            assert_eq!(data.len(), values * width);
        }
        // check_len is the coordinator's bound (at most the uncompressed size): a short
        // payload passes it, and decode (exact) refuses it.
        Err(CodecError::Length { got, expected, .. }) => {
            assert_eq!(checked.is_err(), got > expected)
        }
        Err(CodecError::BadScale(s)) => {
            assert_eq!(codec, Codec::Int8);
            assert!(!(s.is_finite() && *s > 0.0), "refused a usable scale {s}");
            return;
        }
        Err(CodecError::BadZeroPoint(z)) => {
            assert_eq!(codec, Codec::Int8);
            assert!(!(0.0..=255.0).contains(z), "refused a usable zero point {z}");
            return;
        }
        Err(CodecError::RangeTooWide { reach, .. }) => {
            assert_eq!(codec, Codec::Int8);
            assert!(
                !(reach.abs() <= spotlight_codec::MAX_ABS_VALUE),
                "refused a range of {reach}"
            );
            return;
        }
        Err(e) => panic!("decode failed with {e:?}"),
    }
    let Ok(out) = decoded else { return };

    match codec {
        // Bit-exact both ways, NaN payloads included.
        Codec::F32 => assert_eq!(encode(Codec::F32, &out).data, data),
        // f16 → f32 is exact, so re-encoding gives the same bits for every non-NaN value.
        Codec::F16 => {
            for (v, b) in out.iter().zip(data.chunks_exact(2)) {
                let h = half::f16::from_le_bytes([b[0], b[1]]);
                if h.is_nan() {
                    assert!(v.is_nan());
                } else {
                    assert_eq!(half::f16::from_f32(*v).to_le_bytes(), [b[0], b[1]]);
                }
            }
        }
        // Affine with a positive scale: larger bytes never decode to smaller values.
        Codec::Int8 | Codec::Int8PerChannel | Codec::Int4PerChannel => {
            if !zero_point.is_nan() {
                for (v, &b) in out.iter().zip(&data) {
                    let lo = scale * (0.0 - zero_point);
                    let hi = scale * (255.0 - zero_point);
                    assert!(
                        v.is_nan() || (lo <= *v && *v <= hi),
                        "byte {b} decoded to {v}, outside [{lo}, {hi}]"
                    );
                }
            }
        }
    }

    // And the other way: what the edge encodes, a worker decodes to the same length, f32
    // exactly and int8 within one quantisation step for finite tensors of finite range.
    let floats: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let e = encode(codec, &floats);
    assert_eq!(e.codec, codec);
    assert_eq!(e.data.len(), codec.encoded_len(floats.len()));
    let back = decode(codec, &e.data, e.scale, e.zero_point, floats.len());
    match codec {
        Codec::F32 => assert_eq!(
            back.map(|b| b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()),
            Ok(floats.iter().map(|v| v.to_bits()).collect())
        ),
        Codec::F16 => assert_eq!(back.map(|b| b.len()), Ok(floats.len())),
        Codec::Int8 | Codec::Int8PerChannel | Codec::Int4PerChannel => {
            // What the worker accepts: finite values within ±MAX_ABS_VALUE.
            let finite = floats
                .iter()
                .all(|v| v.is_finite() && v.abs() <= spotlight_codec::MAX_ABS_VALUE);
            let (lo, hi) = floats
                .iter()
                .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            if finite {
                let back = match back {
                    Ok(back) => back,
                    Err(err) => panic!("int8 of finite {floats:?} does not decode: {err}"),
                };
                if !(hi - lo).is_finite() {
                    return;
                }
                for (a, b) in floats.iter().zip(&back) {
                    let err = (a - b).abs();
                    assert!(
                        err <= e.scale * 1.01,
                        "int8 round trip of {a} gave {b} (scale {})",
                        e.scale
                    );
                }
            }
        }
    }
});

/// The worker's path: any payload is an error or finite values within range; and what the
/// edge encodes (any codec, channel count and lossless stage) decodes within the codec's
/// bound.
#[allow(clippy::too_many_arguments)]
fn payload_path(
    codec: Codec,
    compression: i32,
    data: &[u8],
    scale: f32,
    zero_point: f32,
    channel_params: &[u8],
    values: usize,
    values_from_len: bool,
    channels: u8,
) {
    let compression = match Compression::from_wire(compression) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e, CodecError::UnknownCompression(compression));
            return;
        }
    };
    let values = if values_from_len {
        data.len() * 2
    } else {
        values
    };
    let p = Payload {
        codec,
        compression,
        data,
        scale,
        zero_point,
        channel_params,
    };
    let checked = check_payload(&p, values);
    match decode_payload(&p, values) {
        Ok(out) => {
            assert!(checked.is_ok(), "decode_payload accepted what check_payload refused");
            assert_eq!(out.len(), values);
            // Range checks allow float16 rounding and a step beyond ±MAX_ABS_VALUE.
            let limit = spotlight_codec::MAX_ABS_VALUE * 1.001 + 1400.0;
            assert!(
                out.iter().all(|v| v.is_finite() && v.abs() <= limit),
                "decoded a value beyond the range"
            );
        }
        // Compared as text: an error may carry a NaN, which is never equal to itself.
        Err(e) => assert_eq!(
            checked.map_err(|c| format!("{c:?}")),
            Err(format!("{e:?}"))
        ),
    }

    // Edge → worker: the floats in `data`, encoded with `channels` channels and compressed.
    let floats: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .filter(|v| v.is_finite() && v.abs() <= spotlight_codec::MAX_ABS_VALUE)
        .collect();
    let plain = encode_channels(codec, &floats, usize::from(channels));
    let e = compress(plain.clone(), compression);
    assert!(e.data.len() <= plain.data.len(), "compression grew a frame");
    let back = match decode_payload(&e.payload(), floats.len()) {
        Ok(b) => b,
        // Int8 per tensor refuses ranges wider than ±MAX_ABS_VALUE allows; the others
        // decode every finite tensor within range.
        Err(err) => {
            assert_eq!(codec, Codec::Int8, "{codec:?} of {floats:?} does not decode: {err}");
            return;
        }
    };
    if codec.per_channel() {
        let per = floats.len() / (e.channel_params.len() / 4).max(1);
        for (i, (a, b)) in floats.iter().zip(&back).enumerate() {
            let p = &e.channel_params[(i / per.max(1)) * 4..];
            let step = half::f16::from_le_bytes([p[2], p[3]]).to_f32();
            let tol = step * 0.5 + a.abs().max(1.0) * 4.0 * f32::EPSILON;
            assert!((a - b).abs() <= tol, "{codec:?}: {a} decoded to {b} (step {step})");
        }
    }
}
