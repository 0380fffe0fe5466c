//! Any bytes as a `spotlight.v1.EdgeMessage` (prost), as the coordinator's inference stream
//! receives them; each frame goes through the coordinator's own tensor check
//! (`router::check_features`). A frame the coordinator lets through must also pass the
//! worker's `check_request`, unless its values are out of range (only workers decode).
//!
//! Input: one flags byte, then the protobuf. Flag bit 0 gives every frame with a tensor but no
//! shape the model's shape, so that the codec checks behind the shape check get exercised.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use spotlight_coordinator::ErrorCode;
use spotlight_coordinator::router::check_features;
use spotlight_proto::v1 as pb;
use spotlight_worker::engine::check_request;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let Ok(message) = pb::EdgeMessage::decode(bytes) else {
        return;
    };
    let model = spotlight_fuzz::model();
    let mut frames = match message.kind {
        Some(pb::edge_message::Kind::Frame(f)) => vec![f],
        Some(pb::edge_message::Kind::Frames(b)) => b.frames,
        Some(pb::edge_message::Kind::Hello(_)) | None => return,
    };
    if flags & 1 != 0 {
        for f in &mut frames {
            if let Some(t) = f.features.as_mut().filter(|t| t.shape.is_empty()) {
                t.shape = model.feature_shape(1);
            }
        }
    }

    let hosted = vec![true; model.segments().len()];
    let all: Vec<pb::SegmentRun> = model
        .segments()
        .iter()
        .map(|s| pb::SegmentRun {
            segment_id: s.id.clone(),
            gain: 1.0,
        })
        .collect();
    let mut passed = Vec::new();
    for f in &frames {
        match check_features(model, f.features.as_ref()) {
            Ok(()) => passed.push(f.features.clone().unwrap_or_default()),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
                assert!(!e.message.is_empty());
            }
        }
    }
    for chunk in passed.chunks(spotlight_worker::engine::MAX_FRAMES_PER_BATCH) {
        let checked = match check_request(model, &hosted, model.hash(), &all, chunk.to_vec()) {
            Ok(checked) => checked,
            Err(e) => panic!("the worker refused a whole batch the coordinator accepted: {e}"),
        };
        // The coordinator checks shape and length only (it forwards bytes untouched); the
        // worker also checks the values. So a frame the coordinator passed may be refused
        // only for its values.
        for e in &checked.errors {
            let t = &chunk[e.index as usize];
            let codec = spotlight_codec::Codec::from_wire(t.codec).expect("codec checked");
            assert!(
                spotlight_codec::check_values(codec, &t.data, t.scale, t.zero_point).is_err(),
                "the coordinator accepted frame {} that the worker refuses for more than its values: {}",
                e.index,
                e.message
            );
        }
        assert_eq!(checked.frames.len() + checked.errors.len(), chunk.len());
    }
});
