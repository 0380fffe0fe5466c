//! The backbone on ONNX Runtime, and the dedicated thread that runs it for the pipeline.
//! Nothing here may run on a tokio worker: `Backbone` calls block.

use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use spotlight_codec::{Codec, Compression};
use spotlight_model::Model;
use spotlight_proto::v1::FeatureTensor;
use spotlight_runtime::BackboneSession;
use tokio::sync::mpsc;

use crate::EdgeError;
use crate::image_input::decode_image;
use crate::record::{FrameFailure, Input, Item, ItemMeta, Sink, code};

/// Encodes backbone outputs as wire tensors of shape `[1, …]`, uncompressed.
pub fn feature_tensor(codec: Codec, model: &Model, values: &[f32]) -> FeatureTensor {
    encode_features(codec, Compression::None, model, values)
}

/// Encodes backbone outputs as wire tensors of shape `[1, C, …]`: per-channel codecs
/// quantise each of the C channels on its own range; `compression` is applied where it
/// makes the frame smaller (the frame says which). What the edge sends, and what
/// `spotlight eval` measures.
pub fn encode_features(
    codec: Codec,
    compression: Compression,
    model: &Model,
    values: &[f32],
) -> FeatureTensor {
    let shape = model.feature_shape(1);
    let channels = shape.get(1).map_or(1, |&c| usize::try_from(c).unwrap_or(1));
    let e = spotlight_codec::compress(
        spotlight_codec::encode_channels(codec, values, channels),
        compression,
    );
    FeatureTensor {
        codec: e.codec.wire(),
        shape,
        data: e.data.into(),
        scale: e.scale,
        zero_point: e.zero_point,
        channel_params: e.channel_params,
        compression: e.compression.wire(),
    }
}

/// Image pixels in, encoded feature tensors out. Blocking: use it on a dedicated thread or
/// in `spawn_blocking`.
pub struct Backbone {
    session: BackboneSession,
    model: Arc<Model>,
    codec: Codec,
    compression: Compression,
    input: Vec<f32>,
    one: Vec<f32>,
}

impl Backbone {
    /// Opens `backbone.onnx` of `model` (ONNX Runtime must be initialised, or findable by
    /// `spotlight_runtime::init_onnxruntime(None)`).
    pub fn open(model: Arc<Model>, codec: Codec, threads: usize) -> Result<Self, EdgeError> {
        let session = BackboneSession::open(&model, threads)?;
        Ok(Self {
            session,
            model,
            codec,
            compression: Compression::None,
            input: Vec::new(),
            one: Vec::new(),
        })
    }

    /// Applies `compression` to every frame where it makes the frame smaller.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Bytes of one image: `H × W × channels` of the manifest input.
    pub fn image_len(&self) -> usize {
        let (c, h, w) = self.model.manifest().input.chw();
        c * h * w
    }

    /// Runs a batch of images (interleaved 8-bit pixels in the manifest's color and size);
    /// returns the raw features of each.
    pub fn features(&mut self, images: &[&[u8]]) -> Result<Vec<Vec<f32>>, EdgeError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let expected = self.image_len();
        if let Some((i, img)) = images.iter().enumerate().find(|(_, p)| p.len() != expected) {
            return Err(EdgeError::Image(format!(
                "image {i} has {} bytes; the model input needs {expected}",
                img.len()
            )));
        }
        let spec = &self.model.manifest().input;
        self.input.clear();
        for img in images {
            spotlight_model::preprocess(spec, img, &mut self.one);
            self.input.extend_from_slice(&self.one);
        }
        let out = self
            .session
            .run(std::mem::take(&mut self.input), images.len())?;
        let per = self.model.feature_len();
        if out.len() != per * images.len() {
            return Err(EdgeError::Image(format!(
                "backbone returned {} values for {} images; expected {} each",
                out.len(),
                images.len(),
                per
            )));
        }
        Ok(out.chunks_exact(per).map(<[f32]>::to_vec).collect())
    }

    /// Runs and encodes a batch.
    pub fn encode_batch(&mut self, images: &[&[u8]]) -> Result<Vec<FeatureTensor>, EdgeError> {
        Ok(self
            .features(images)?
            .iter()
            .map(|f| self.encode_one(f))
            .collect())
    }

    /// Encodes one image's features with the stream's codec and lossless stage.
    pub fn encode_one(&self, features: &[f32]) -> FeatureTensor {
        encode_features(self.codec, self.compression, &self.model, features)
    }

    /// Runs and encodes one image.
    pub fn encode(&mut self, pixels: &[u8]) -> Result<FeatureTensor, EdgeError> {
        self.encode_batch(&[pixels])?
            .pop()
            .ok_or_else(|| EdgeError::Image("backbone returned no features".into()))
    }
}

/// An encoded frame ready to send.
#[derive(Debug)]
pub struct Job {
    pub meta: ItemMeta,
    pub features: FeatureTensor,
    /// When the backbone started on it.
    pub started: Instant,
}

/// Takes items off `items`, batching up to `batch_size` of those already queued, and sends
/// one job per image to `jobs`. Failures become records at once. Returns when `items`
/// closes. With `hold` (the edge's `precompute`), no job is sent before `items` closes.
pub(crate) fn serve(
    mut backbone: Backbone,
    batch_size: usize,
    mut items: mpsc::Receiver<Item>,
    jobs: mpsc::Sender<Job>,
    sink: Sink,
    hold: bool,
) {
    let mut held = Vec::new();
    let send = |job: Job| {
        if let Err(mpsc::error::SendError(job)) = jobs.blocking_send(job) {
            sink.fail(
                job.meta,
                FrameFailure::new(code::CANCELLED, "the stream to the coordinator has stopped"),
            );
        }
    };
    let spec = backbone.model().manifest().input.clone();
    while let Some(first) = items.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match items.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut metas = Vec::with_capacity(batch.len());
        let mut pixels = Vec::with_capacity(batch.len());
        for Item { meta, input } in batch {
            let decoded = match input {
                Input::Pixels(p) => Ok(p),
                Input::Encoded(bytes) => decode_image(&bytes, &spec)
                    .map_err(|m| FrameFailure::new(code::INVALID_ARGUMENT, m)),
                Input::Failed(f) => Err(f),
            };
            match decoded {
                Ok(p) => {
                    metas.push(meta);
                    pixels.push(p);
                }
                Err(f) => sink.fail(meta, f),
            }
        }
        if metas.is_empty() {
            continue;
        }
        let started = Instant::now();
        let refs: Vec<&[u8]> = pixels.iter().map(Vec::as_slice).collect();
        let span = tracing::debug_span!("backbone", batch = refs.len());
        let metrics = sink.metrics();
        let result = span.in_scope(|| {
            let features = backbone.features(&refs)?;
            metrics
                .backbone_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok::<_, EdgeError>(
                features
                    .iter()
                    .map(|f| {
                        let t = Instant::now();
                        let tensor = backbone.encode_one(f);
                        metrics.encode_seconds.observe(t.elapsed().as_secs_f64());
                        metrics.bytes_out.inc_by(tensor.encoded_len() as u64);
                        tensor
                    })
                    .collect::<Vec<_>>(),
            )
        });
        match result {
            Ok(tensors) => {
                for (meta, features) in metas.into_iter().zip(tensors) {
                    let job = Job {
                        meta,
                        features,
                        started,
                    };
                    if hold {
                        held.push(job);
                    } else {
                        send(job);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "backbone failed");
                for meta in metas {
                    sink.fail(meta, FrameFailure::new(code::INTERNAL, e.to_string()));
                }
            }
        }
    }
    if hold {
        tracing::info!(frames = held.len(), "precomputed; sending");
    }
    held.into_iter().for_each(send);
}
