//! ONNX Runtime sessions for a model package: the backbone (edge), the segments (workers) and
//! the monolithic graph (equivalence tests, benchmarks). Kept out of `spotlight-model` so that
//! roles that run no model (the coordinator) neither link nor load ONNX Runtime.
//!
//! Every `run` here blocks: call it from a dedicated thread or a bounded blocking pool, never
//! from an async task.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::value::Tensor;

use spotlight_model::{FullSpec, Model, SegmentSpec};

/// The file name the setup step (`make onnxruntime`) installs under `build/onnxruntime/`.
const LIBRARY_FILE: &str = "libonnxruntime.so";

/// Errors from ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum OnnxRuntimeError {
    /// The shared library is not where we looked.
    #[error(
        "ONNX Runtime library not found (looked at: {tried}); run `make onnxruntime` to install \
         onnxruntime 1.31.1 from PyPI into build/onnxruntime/, or set ORT_DYLIB_PATH to a \
         libonnxruntime.so of version 1.31 or newer"
    )]
    LibraryNotFound { tried: String },
    /// Loading the library or creating the environment failed.
    #[error("cannot initialise ONNX Runtime from {path}: {message}")]
    Init { path: PathBuf, message: String },
    /// A session could not be created.
    #[error("cannot load {path}: {message}")]
    Load { path: PathBuf, message: String },
    /// Inference failed.
    #[error("inference failed in {what}: {message}")]
    Run { what: String, message: String },
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
static LIBRARY: OnceLock<PathBuf> = OnceLock::new();

/// Finds the ONNX Runtime shared library: `explicit` (config), then `ORT_DYLIB_PATH`, then
/// `build/onnxruntime/libonnxruntime.so` under the working directory, next to the
/// executable, and in the source tree this binary was built from.
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, OnnxRuntimeError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        candidates.push(PathBuf::from(p));
    }
    if candidates.is_empty() {
        candidates.push(Path::new("build/onnxruntime").join(LIBRARY_FILE));
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.push(dir.join(LIBRARY_FILE));
        }
        candidates.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../build/onnxruntime")
                .join(LIBRARY_FILE),
        );
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OnnxRuntimeError::LibraryNotFound {
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Loads ONNX Runtime once per process. Later calls return the first outcome.
pub fn init_onnxruntime(explicit: Option<&Path>) -> Result<(), OnnxRuntimeError> {
    if let Some(result) = ENVIRONMENT.get() {
        return result
            .as_ref()
            .map(|_| ())
            .map_err(|message| OnnxRuntimeError::Init {
                path: LIBRARY.get().cloned().unwrap_or_default(),
                message: message.clone(),
            });
    }
    let path = resolve_library(explicit)?;
    let result = ENVIRONMENT.get_or_init(|| {
        let _ = LIBRARY.set(path.clone());
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        builder
            .with_name("spotlight")
            .build()
            .map_err(|e| e.to_string())
    });
    result
        .as_ref()
        .map(|_| ())
        .map_err(|message| OnnxRuntimeError::Init {
            path,
            message: message.clone(),
        })
}

fn environment() -> Result<&'static ort::environment::Environment, OnnxRuntimeError> {
    match ENVIRONMENT.get() {
        Some(Ok(env)) => Ok(env),
        Some(Err(message)) => Err(OnnxRuntimeError::Init {
            path: LIBRARY.get().cloned().unwrap_or_default(),
            message: message.clone(),
        }),
        None => {
            init_onnxruntime(None)?;
            environment()
        }
    }
}

fn open(path: &Path, threads: usize) -> Result<Session, OnnxRuntimeError> {
    let load_err = |message: String| OnnxRuntimeError::Load {
        path: path.to_path_buf(),
        message,
    };
    // Builder errors carry the builder and are not Send; keep them inside this function.
    fn build(
        env: &ort::environment::Environment,
        path: &Path,
        threads: usize,
    ) -> ort::Result<Session> {
        Session::builder(env)?
            .with_intra_threads(threads.max(1))
            .map_err(ort::Error::<()>::from)?
            .with_inter_threads(1)
            .map_err(ort::Error::<()>::from)?
            .commit_from_file(path)
    }
    build(environment()?, path, threads).map_err(|e| load_err(e.to_string()))
}

fn run_err(what: &str) -> impl Fn(ort::Error) -> OnnxRuntimeError + '_ {
    move |e| OnnxRuntimeError::Run {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The backbone: image batch in, bottleneck features out.
pub struct BackboneSession {
    session: Session,
    input: String,
    output: String,
    image_shape: Vec<i64>,
}

impl BackboneSession {
    /// Opens `backbone.onnx` of `model` with `threads` intra-op threads.
    pub fn open(model: &Model, threads: usize) -> Result<Self, OnnxRuntimeError> {
        let spec = &model.manifest().backbone;
        Ok(Self {
            session: open(&model.path_of(&spec.file), threads)?,
            input: spec.input.clone(),
            output: spec.output.clone(),
            image_shape: model.manifest().input.shape.clone(),
        })
    }

    /// Runs a batch of `n` preprocessed images (NCHW, concatenated); returns the features of
    /// all `n`, concatenated.
    pub fn run(&mut self, images: Vec<f32>, n: usize) -> Result<Vec<f32>, OnnxRuntimeError> {
        let mut shape = self.image_shape.clone();
        shape[0] = n as i64;
        let err = run_err("backbone");
        let input = Tensor::from_array((shape, images)).map_err(&err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => input])
            .map_err(&err)?;
        let (_, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        Ok(data.to_vec())
    }
}

/// What one segment produced for a batch.
#[derive(Debug, Clone, Default)]
pub struct SegmentOutputs {
    /// Gained high-level features (input of the children), if the segment has children.
    pub features: Option<Vec<f32>>,
    /// Logits of the direct categories, `[n, k]` row-major, if any.
    pub logits: Option<Vec<f32>>,
}

/// One high-level segment.
pub struct SegmentSession {
    session: Session,
    spec: SegmentSpec,
}

impl SegmentSession {
    /// Opens the segment's ONNX file.
    pub fn open(model: &Model, segment: usize, threads: usize) -> Result<Self, OnnxRuntimeError> {
        let spec = model.segments()[segment].clone();
        Ok(Self {
            session: open(&model.path_of(&spec.file), threads)?,
            spec,
        })
    }

    /// The segment's manifest entry.
    pub fn spec(&self) -> &SegmentSpec {
        &self.spec
    }

    /// Runs a batch of `n`: `input` is the parent's (or backbone's) features, `gains` one
    /// gain per sample.
    pub fn run(
        &mut self,
        input: Vec<f32>,
        gains: Vec<f32>,
    ) -> Result<SegmentOutputs, OnnxRuntimeError> {
        let n = gains.len();
        let mut shape = self.spec.input.shape.clone();
        shape[0] = n as i64;
        let err = run_err(&self.spec.id);
        let x = Tensor::from_array((shape, input)).map_err(&err)?;
        let g = Tensor::from_array(([n, 1usize], gains)).map_err(&err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.spec.input.name.as_str() => x, self.spec.gain_input.as_str() => g])
            .map_err(&err)?;
        let mut result = SegmentOutputs::default();
        if let Some(f) = &self.spec.features_output {
            let (_, data) = outputs[f.name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(&err)?;
            result.features = Some(data.to_vec());
        }
        if let Some(l) = &self.spec.logits_output {
            let (_, data) = outputs[l.name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(&err)?;
            result.logits = Some(data.to_vec());
        }
        Ok(result)
    }
}

/// A top-level segment fused with its whole subtree (manifest `branches`): one run gives
/// the logits of every segment of the subtree that scores categories.
pub struct BranchSession {
    session: Session,
    spec: spotlight_model::BranchSpec,
    /// Segment index of each entry of `spec.segments`.
    segments: Vec<usize>,
    /// (segment index, output name) of each segment with logits, in manifest order.
    outputs: Vec<(usize, String)>,
    input_shape: Vec<i64>,
}

impl BranchSession {
    /// Opens branch `branch` (index into the manifest's `branches`).
    pub fn open(model: &Model, branch: usize, threads: usize) -> Result<Self, OnnxRuntimeError> {
        let spec = model.manifest().branches[branch].clone();
        let index = |id: &str| {
            model
                .segment_index(id)
                .ok_or_else(|| OnnxRuntimeError::Load {
                    path: model.path_of(&spec.file),
                    message: format!("branch {} names unknown segment {id}", spec.id),
                })
        };
        let segments = spec
            .segments
            .iter()
            .map(|id| index(id))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outputs = Vec::new();
        for &s in &segments {
            if let Some(name) = spec.logits_outputs.get(&model.segments()[s].id) {
                outputs.push((s, name.clone()));
            }
        }
        Ok(Self {
            session: open(&model.path_of(&spec.file), threads)?,
            input_shape: model.segments()[segments[0]].input.shape.clone(),
            spec,
            segments,
            outputs,
        })
    }

    /// Segment indices the branch covers, top-level first (manifest order).
    pub fn segments(&self) -> &[usize] {
        &self.segments
    }

    /// Runs a batch: `input` holds `n` rows of backbone features, `gains` `n` rows of one
    /// gain per segment (in [`BranchSession::segments`] order). Returns (segment index, `[n,
    /// k]` logits) for each segment with direct categories.
    pub fn run(
        &mut self,
        input: Vec<f32>,
        gains: Vec<f32>,
        n: usize,
    ) -> Result<Vec<(usize, Vec<f32>)>, OnnxRuntimeError> {
        let mut shape = self.input_shape.clone();
        shape[0] = n as i64;
        let err = run_err(&self.spec.id);
        let x = Tensor::from_array((shape, input)).map_err(&err)?;
        let g = Tensor::from_array(([n, self.segments.len()], gains)).map_err(&err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.spec.input.as_str() => x, self.spec.gains_input.as_str() => g])
            .map_err(&err)?;
        self.outputs
            .iter()
            .map(|(s, name)| {
                let (_, data) = outputs[name.as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(&err)?;
                Ok((*s, data.to_vec()))
            })
            .collect()
    }
}

/// The monolithic graph (`full.onnx`): images and per-segment gains in, all logits out.
pub struct FullSession {
    session: Session,
    spec: FullSpec,
    image_shape: Vec<i64>,
    segments: usize,
}

impl FullSession {
    /// Opens `full.onnx`.
    pub fn open(model: &Model, threads: usize) -> Result<Self, OnnxRuntimeError> {
        let spec = model.manifest().full.clone();
        Ok(Self {
            session: open(&model.path_of(&spec.file), threads)?,
            spec,
            image_shape: model.manifest().input.shape.clone(),
            segments: model.segments().len(),
        })
    }

    /// Runs `n` images with `gains` (`n × segments`, row-major); returns `n × categories` logits.
    pub fn run(
        &mut self,
        images: Vec<f32>,
        n: usize,
        gains: Vec<f32>,
    ) -> Result<Vec<f32>, OnnxRuntimeError> {
        let mut shape = self.image_shape.clone();
        shape[0] = n as i64;
        let err = run_err("full");
        let x = Tensor::from_array((shape, images)).map_err(&err)?;
        let g = Tensor::from_array(([n, self.segments], gains)).map_err(&err)?;
        let outputs = self
            .session
            .run(ort::inputs![self.spec.input.as_str() => x, self.spec.gains_input.as_str() => g])
            .map_err(&err)?;
        let (_, data) = outputs[self.spec.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        Ok(data.to_vec())
    }
}
