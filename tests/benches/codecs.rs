//! Feature codecs on real backbone outputs: encoding and decoding one `[1, 8, 7, 7]` tensor
//! per iteration (cycling over the features of a few test images), for each codec.
//! Throughput is in tensor elements.
//!
//! `cargo bench -p spotlight-tests --bench codecs` (needs ONNX Runtime and the dataset, as
//! the end-to-end tests do).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use spotlight_codec::Codec;

/// Test images whose backbone features the codecs run on, in turn.
const IMAGES: usize = 8;

fn codecs(c: &mut Criterion) {
    let model = spotlight_tests::model();
    let (images, _) = spotlight_tests::test_images(IMAGES);
    let features = spotlight_tests::features(&model, &images);
    let len = model.feature_len();
    assert!(features.iter().all(|f| f.len() == len));

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(len as u64));
    for (name, codec) in [
        ("f32", Codec::F32),
        ("f16", Codec::F16),
        ("int8", Codec::Int8),
    ] {
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            let mut tensors = features.iter().cycle();
            b.iter(|| {
                let f = tensors.next().expect("cycle is endless");
                spotlight_codec::encode(codec, black_box(f))
            })
        });
        let encoded: Vec<_> = features
            .iter()
            .map(|f| spotlight_codec::encode(codec, f))
            .collect();
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            let mut tensors = encoded.iter().cycle();
            b.iter(|| {
                let e = tensors.next().expect("cycle is endless");
                spotlight_codec::decode(codec, black_box(&e.data), e.scale, e.zero_point, len)
                    .expect("decodes")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
