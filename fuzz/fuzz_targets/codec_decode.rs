//! `spotlight_codec::check_len` / `decode` on any codec number, value count, scale, zero point
//! and payload: an error or a tensor of exactly the asked length, never a panic; and the
//! round trips each codec promises.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spotlight_codec::{Codec, CodecError, check_len, decode, encode};

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
}

fuzz_target!(|input: Input| {
    let Input {
        codec,
        values,
        values_from_len,
        scale,
        zero_point,
        data,
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
        Err(e @ CodecError::Length { .. }) => assert_eq!(Some(e), checked.as_ref().err()),
        Err(CodecError::BadScale(s)) => {
            assert!(checked.is_ok());
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
        Codec::Int8 => {
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
        Codec::Int8 => {
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
