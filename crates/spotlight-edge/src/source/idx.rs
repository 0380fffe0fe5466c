//! Reader for idx files (the MNIST / Fashion-MNIST format), gzip-compressed or plain.
//!
//! Images: magic `0x00000803`, then count, rows, cols (big-endian u32), then
//! `count × rows × cols` bytes. Labels: magic `0x00000801`, count, then `count` bytes.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Magic number of an idx3 (u8 images) file.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an idx1 (u8 labels) file.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Errors reading idx files.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file could not be read or decompressed.
    #[error("cannot read idx file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The magic number is not the expected one.
    #[error("{what}: magic number is {got:#010x}; expected {expected:#010x}")]
    BadMagic {
        what: String,
        expected: u32,
        got: u32,
    },
    /// The file is shorter or longer than its header says.
    #[error("{what}: header says {expected} bytes of data, file has {got}")]
    Length {
        what: String,
        expected: usize,
        got: usize,
    },
    /// Images and labels disagree.
    #[error("{images} images but {labels} labels")]
    CountMismatch { images: usize, labels: usize },
}

/// A set of gray images, row-major, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `count × rows × cols` pixels.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Pixels of image `i`, if it exists.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.rows * self.cols;
        self.pixels.get(i * n..(i + 1) * n)
    }
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, IdxError> {
    let io = |source| IdxError::Io {
        path: path.to_path_buf(),
        source,
    };
    gunzip_if_needed(std::fs::read(path).map_err(io)?).map_err(io)
}

/// Gunzips `raw` when it starts with the gzip magic bytes; returns it unchanged otherwise.
pub fn gunzip_if_needed(raw: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out)?;
    Ok(out)
}

/// Reads an images file.
pub fn read_images(path: &Path) -> Result<IdxImages, IdxError> {
    parse_images(&read_maybe_gz(path)?, &path.display().to_string())
}

/// Reads a labels file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    parse_labels(&read_maybe_gz(path)?, &path.display().to_string())
}

/// Reads images and, optionally, labels, checking that the counts agree.
pub fn read_dataset(
    images: &Path,
    labels: Option<&Path>,
) -> Result<(IdxImages, Option<Vec<u8>>), IdxError> {
    let images = read_images(images)?;
    let labels = labels.map(read_labels).transpose()?;
    check_counts(&images, labels.as_deref())?;
    Ok((images, labels))
}

/// Checks that there is one label per image.
pub fn check_counts(images: &IdxImages, labels: Option<&[u8]>) -> Result<(), IdxError> {
    match labels {
        Some(l) if l.len() != images.count => Err(IdxError::CountMismatch {
            images: images.count,
            labels: l.len(),
        }),
        _ => Ok(()),
    }
}

fn header<const N: usize>(bytes: &[u8], what: &str) -> Result<[u32; N], IdxError> {
    if bytes.len() < 4 * N {
        return Err(IdxError::Length {
            what: format!("{what} header"),
            expected: 4 * N,
            got: bytes.len(),
        });
    }
    let mut out = [0u32; N];
    for (i, v) in out.iter_mut().enumerate() {
        let b = &bytes[4 * i..4 * i + 4];
        *v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(out)
}

fn check_magic(what: &str, expected: u32, got: u32) -> Result<(), IdxError> {
    if got == expected {
        Ok(())
    } else {
        Err(IdxError::BadMagic {
            what: what.to_string(),
            expected,
            got,
        })
    }
}

/// Parses an (already decompressed) images file; `what` names it in errors.
pub fn parse_images(bytes: &[u8], what: &str) -> Result<IdxImages, IdxError> {
    let [magic, count, rows, cols] = header::<4>(bytes, what)?;
    check_magic(what, IMAGES_MAGIC, magic)?;
    let (count, rows, cols) = (count as usize, rows as usize, cols as usize);
    let expected = count
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .unwrap_or(usize::MAX);
    let data = &bytes[16..];
    if data.len() != expected {
        return Err(IdxError::Length {
            what: what.to_string(),
            expected,
            got: data.len(),
        });
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: data.to_vec(),
    })
}

/// Parses an (already decompressed) labels file; `what` names it in errors.
pub fn parse_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>, IdxError> {
    let [magic, count] = header::<2>(bytes, what)?;
    check_magic(what, LABELS_MAGIC, magic)?;
    let data = &bytes[8..];
    if data.len() != count as usize {
        return Err(IdxError::Length {
            what: what.to_string(),
            expected: count as usize,
            got: data.len(),
        });
    }
    Ok(data.to_vec())
}

/// Serialises images as an idx3 file (for tests and fixtures).
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    for v in [
        IMAGES_MAGIC,
        images.count as u32,
        images.rows as u32,
        images.cols as u32,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Serialises labels as an idx1 file (for tests and fixtures).
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tiny() -> IdxImages {
        IdxImages {
            count: 2,
            rows: 2,
            cols: 3,
            pixels: (0..12).collect(),
        }
    }

    #[test]
    fn round_trips_images_and_labels() {
        let images = tiny();
        let parsed = parse_images(&encode_images(&images), "mem").unwrap();
        assert_eq!(parsed, images);
        assert_eq!(parsed.image(1), Some(&[6u8, 7, 8, 9, 10, 11][..]));
        assert_eq!(parsed.image(2), None);
        assert_eq!(
            parse_labels(&encode_labels(&[9, 0]), "mem").unwrap(),
            vec![9, 0]
        );
    }

    #[test]
    fn bad_magic_is_an_error_naming_both_numbers() {
        let err = parse_images(&encode_labels(&[1, 2, 3, 4, 5, 6, 7, 8]), "x").unwrap_err();
        assert!(matches!(
            err,
            IdxError::BadMagic {
                expected: IMAGES_MAGIC,
                got: LABELS_MAGIC,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "x: magic number is 0x00000801; expected 0x00000803"
        );
        assert!(matches!(
            parse_labels(&encode_images(&tiny()), "y"),
            Err(IdxError::BadMagic { .. })
        ));
    }

    #[test]
    fn truncated_files_are_errors() {
        let mut bytes = encode_images(&tiny());
        bytes.pop();
        assert!(matches!(
            parse_images(&bytes, "t"),
            Err(IdxError::Length {
                expected: 12,
                got: 11,
                ..
            })
        ));
        assert!(matches!(
            parse_labels(&[0, 0], "t"),
            Err(IdxError::Length { .. })
        ));
    }

    #[test]
    fn gunzips_when_compressed_and_checks_counts() {
        let plain = encode_images(&tiny());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let compressed = gz.finish().unwrap();
        assert_ne!(compressed, plain);
        assert_eq!(gunzip_if_needed(compressed).unwrap(), plain);
        assert_eq!(gunzip_if_needed(plain.clone()).unwrap(), plain);
        assert!(gunzip_if_needed(vec![0x1f, 0x8b, 0, 1]).is_err());

        let images = parse_images(&plain, "mem").unwrap();
        check_counts(&images, Some(&[3, 4])).unwrap();
        check_counts(&images, None).unwrap();
        let err = check_counts(&images, Some(&[3])).unwrap_err();
        assert_eq!(err.to_string(), "2 images but 1 labels");
    }
}
