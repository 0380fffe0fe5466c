//! Turning image files and raw gray images into the pixels the manifest asks for:
//! interleaved 8-bit, `gray` (1 channel) or `rgb` (3 channels), `H × W` of the input shape.

use image::DynamicImage;
use image::imageops::FilterType;
use spotlight_model::InputSpec;

/// Decodes a PNG or JPEG and fits it to the manifest's color and size.
pub fn decode_image(bytes: &[u8], spec: &InputSpec) -> Result<Vec<u8>, String> {
    if bytes.is_empty() {
        return Err("empty image; expected PNG or JPEG bytes".into());
    }
    let img = image::load_from_memory(bytes).map_err(|e| {
        format!(
            "cannot decode image ({} bytes): {e}; expected PNG or JPEG",
            bytes.len()
        )
    })?;
    Ok(fit_image(img, spec))
}

/// Converts to the manifest's color and resizes to its `H × W` when needed.
pub fn fit_image(img: DynamicImage, spec: &InputSpec) -> Vec<u8> {
    let (_, h, w) = spec.chw();
    let img = if img.width() as usize != w || img.height() as usize != h {
        img.resize_exact(w as u32, h as u32, FilterType::Triangle)
    } else {
        img
    };
    if spec.color == "rgb" {
        img.into_rgb8().into_raw()
    } else {
        img.into_luma8().into_raw()
    }
}

/// Fits a raw gray image (`rows × cols`, one byte per pixel) to the manifest.
pub fn fit_gray(
    pixels: &[u8],
    rows: usize,
    cols: usize,
    spec: &InputSpec,
) -> Result<Vec<u8>, String> {
    let (c, h, w) = spec.chw();
    if c == 1 && rows == h && cols == w {
        return Ok(pixels.to_vec());
    }
    let gray =
        image::GrayImage::from_raw(cols as u32, rows as u32, pixels.to_vec()).ok_or_else(|| {
            format!(
                "gray image of {} bytes does not fit {rows}×{cols}",
                pixels.len()
            )
        })?;
    Ok(fit_image(DynamicImage::ImageLuma8(gray), spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(color: &str, c: i64, h: i64, w: i64) -> InputSpec {
        InputSpec {
            name: "image".into(),
            shape: vec![-1, c, h, w],
            dtype: "float32".into(),
            color: color.into(),
            scale: 255.0,
            mean: vec![0.0; c as usize],
            std: vec![1.0; c as usize],
        }
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_rgb_png_to_gray_at_manifest_size() {
        let img = image::RgbImage::from_pixel(56, 56, image::Rgb([200, 200, 200]));
        let pixels =
            decode_image(&png(DynamicImage::ImageRgb8(img)), &spec("gray", 1, 28, 28)).unwrap();
        assert_eq!(pixels.len(), 28 * 28);
        assert!(pixels.iter().all(|&p| p == 200), "{:?}", &pixels[..4]);
    }

    #[test]
    fn gray_to_rgb_replicates_channels() {
        let pixels = fit_gray(&[10, 20, 30, 40], 2, 2, &spec("rgb", 3, 2, 2)).unwrap();
        assert_eq!(pixels, vec![10, 10, 10, 20, 20, 20, 30, 30, 30, 40, 40, 40]);
        assert_eq!(
            fit_gray(&[1, 2], 1, 2, &spec("gray", 1, 1, 2)).unwrap(),
            vec![1, 2]
        );
        assert!(fit_gray(&[1, 2, 3], 2, 2, &spec("gray", 1, 4, 4)).is_err());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = decode_image(b"not an image", &spec("gray", 1, 28, 28)).unwrap_err();
        assert!(err.contains("expected PNG or JPEG"), "{err}");
        assert!(decode_image(b"", &spec("gray", 1, 28, 28)).is_err());
    }
}
