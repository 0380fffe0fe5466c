//! Dataset sources: feed items into the pipeline until exhausted, the limit, or stop.

pub mod folder;
pub mod idx;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spotlight_model::Model;
use tokio::sync::mpsc;

use crate::EdgeError;
use crate::config::SourceConfig;
use crate::image_input::fit_gray;
use crate::record::{FrameFailure, Input, Item, ItemMeta, SeqGen, code};

/// A dataset loaded and ready to stream.
pub(crate) enum Dataset {
    Idx {
        name: String,
        images: idx::IdxImages,
        labels: Option<Vec<u8>>,
    },
    Folder {
        files: Vec<PathBuf>,
    },
}

/// Loads the dataset of `source` (blocking file IO; call from `spawn_blocking`). Errors
/// here are fatal: the source as a whole is unusable.
pub(crate) fn load(source: &SourceConfig, model: &Model) -> Result<Option<Dataset>, EdgeError> {
    match source {
        SourceConfig::None => Ok(None),
        SourceConfig::Idx { images, labels } => {
            let (imgs, labels) = idx::read_dataset(images, labels.as_deref())?;
            let n = model.categories().len();
            if let Some(bad) = labels
                .as_ref()
                .and_then(|l| l.iter().find(|&&l| l as usize >= n))
            {
                return Err(EdgeError::Source(format!(
                    "label {bad} in the labels file is not a category index; the model has {n} \
                     categories"
                )));
            }
            let name = images.file_name().map_or_else(
                || images.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            );
            Ok(Some(Dataset::Idx {
                name,
                images: imgs,
                labels,
            }))
        }
        SourceConfig::Folder { path } => {
            let files = folder::list_images(path).map_err(|e| {
                EdgeError::Source(format!("cannot list images under {}: {e}", path.display()))
            })?;
            if files.is_empty() {
                return Err(EdgeError::Source(format!(
                    "no PNG or JPEG images under {}",
                    path.display()
                )));
            }
            Ok(Some(Dataset::Folder { files }))
        }
    }
}

/// Sends the dataset's items to `items`; returns the number sent.
pub(crate) async fn feed(
    dataset: Dataset,
    model: Arc<Model>,
    limit: Option<u64>,
    seq: SeqGen,
    items: mpsc::Sender<Item>,
    stop: spotlight_service::Shutdown,
) -> u64 {
    let limit = limit.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let spec = &model.manifest().input;
    let next = |i: usize| -> Option<Item> {
        match &dataset {
            Dataset::Idx {
                name,
                images,
                labels,
            } => {
                let pixels = images.image(i)?;
                let input = match fit_gray(pixels, images.rows, images.cols, spec) {
                    Ok(p) => Input::Pixels(p),
                    Err(m) => Input::Failed(FrameFailure::new(code::INVALID_ARGUMENT, m)),
                };
                Some(Item {
                    meta: ItemMeta {
                        seq: seq.next(),
                        item: format!("{name}#{i}"),
                        label: labels.as_ref().and_then(|l| l.get(i)).map(|&l| l as usize),
                        reply: None,
                    },
                    input,
                })
            }
            Dataset::Folder { files } => {
                let path = files.get(i)?;
                Some(Item {
                    meta: ItemMeta {
                        seq: seq.next(),
                        item: path.display().to_string(),
                        label: folder::label_for(path, model.categories()),
                        reply: None,
                    },
                    // Read below, asynchronously.
                    input: Input::Encoded(Vec::new()),
                })
            }
        }
    };
    let mut i = 0usize;
    while sent < limit {
        let Some(mut item) = next(i) else { break };
        if let Dataset::Folder { .. } = &dataset {
            item.input = read_file(Path::new(&item.meta.item)).await;
        }
        i += 1;
        tokio::select! {
            r = items.send(item) => if r.is_err() { break },
            _ = stop.begun() => break,
        }
        sent += 1;
    }
    tracing::info!(sent, "source finished");
    sent
}

async fn read_file(path: &Path) -> Input {
    match tokio::fs::read(path).await {
        Ok(bytes) => Input::Encoded(bytes),
        Err(e) => Input::Failed(FrameFailure::new(
            code::INVALID_ARGUMENT,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}
