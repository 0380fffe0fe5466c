//! Any bytes as a `spotlight.v1.RunBatch` (prost), checked by the worker's `check_request`
//! against the shipped model, as a worker does before queueing. A bad request is refused as a
//! whole (wrong model, bad segment list) or per frame; never a panic. Every frame it lets
//! through must decode to the model's feature length.
//!
//! Input: one flags byte, then the protobuf. Flags steer the fuzzer past checks it would
//! rarely pass on its own: bit 0 puts the model's hash in, bit 1 turns every segment id of at
//! most one byte into a model segment id (the byte picks which), bit 2 gives every frame with
//! no shape the model's shape; bits 3..8 say which of the (five) segments are hosted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use spotlight_codec::{Codec, CodecError};
use spotlight_proto::v1 as pb;
use spotlight_worker::EngineError;
use spotlight_worker::engine::{MAX_FRAMES_PER_BATCH, check_request};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let Ok(mut batch) = pb::RunBatch::decode(bytes) else {
        return;
    };
    let model = spotlight_fuzz::model();
    let nseg = model.segments().len();
    if flags & 1 != 0 {
        batch.model_hash = model.hash().to_string();
    }
    if flags & 2 != 0 {
        for r in &mut batch.segments {
            if r.segment_id.len() <= 1 {
                let pick = r.segment_id.bytes().next().unwrap_or(0) as usize % nseg;
                r.segment_id = model.segments()[pick].id.clone();
            }
        }
    }
    if flags & 4 != 0 {
        for f in &mut batch.features {
            if f.shape.is_empty() {
                f.shape = model.feature_shape(1);
            }
        }
    }
    let hosted: Vec<bool> = (0..nseg).map(|s| (flags >> 3) & (1 << s) != 0).collect();

    let n = batch.features.len();
    let features = batch.features.clone();
    let checked = check_request(
        model,
        &hosted,
        &batch.model_hash,
        &batch.segments,
        batch.features,
    );
    let checked = match checked {
        Ok(checked) => checked,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    EngineError::WrongModel { .. }
                        | EngineError::BadRequest(_)
                        | EngineError::NotHosted(_)
                ),
                "check_request failed with {e:?}"
            );
            return;
        }
    };
    assert!(n <= MAX_FRAMES_PER_BATCH, "accepted a batch of {n} frames");
    assert_eq!(batch.model_hash, model.hash());

    // Segments: the ones asked for, hosted, each once, parents first, gains usable.
    assert_eq!(checked.segments.len(), batch.segments.len());
    for (k, &(s, gain)) in checked.segments.iter().enumerate() {
        assert!(hosted[s], "segment {s} is not hosted");
        assert!(gain.is_finite() && gain >= 0.0, "gain {gain}");
        assert!(checked.segments[..k].iter().all(|w| w.0 < s));
        if let Some(p) = model.parent_of(s) {
            assert!(checked.segments[..k].iter().any(|w| w.0 == p));
        }
    }

    // Frames: each one either passed or has its own error, in request order.
    let mut seen = vec![false; n];
    for e in &checked.errors {
        let i = e.index as usize;
        assert!(i < n && !std::mem::replace(&mut seen[i], true));
        assert_eq!(e.code, tonic_code_invalid_argument());
        assert!(!e.message.is_empty());
    }
    assert!(checked.errors.windows(2).all(|w| w[0].index < w[1].index));
    let len = model.feature_len();
    for (i, f) in &checked.frames {
        let i = *i as usize;
        assert!(i < n && !std::mem::replace(&mut seen[i], true));
        assert_eq!(f, &features[i]);
        assert_eq!(f.shape, model.feature_shape(1));
        // What the batcher does next: decode to the model's length. Only an int8 scale can
        // still be refused there.
        let decoded = Codec::from_wire(f.codec)
            .and_then(|c| spotlight_codec::decode(c, &f.data, f.scale, f.zero_point, len));
        match decoded {
            Ok(values) => assert_eq!(values.len(), len),
            Err(CodecError::BadScale(_)) => {}
            Err(e) => panic!("frame {i} passed the check but does not decode: {e}"),
        }
    }
    assert!(
        seen.iter().all(|&s| s),
        "a frame got neither a result nor an error"
    );
});

/// `tonic::Code::InvalidArgument` as the wire number (tonic is not a direct dependency).
fn tonic_code_invalid_argument() -> i32 {
    3
}
