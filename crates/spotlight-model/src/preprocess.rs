use crate::InputSpec;

/// Turns interleaved 8-bit pixels (`height × width × channels`, the channels the manifest
/// asks for) into the normalised NCHW float tensor of one image, as the manifest says:
/// `(pixel / scale - mean[c]) / std[c]`.
pub fn preprocess(spec: &InputSpec, pixels: &[u8], out: &mut Vec<f32>) {
    let (c, h, w) = spec.chw();
    out.clear();
    out.reserve(c * h * w);
    for ch in 0..c {
        let (mean, std) = (spec.mean[ch], spec.std[ch]);
        for i in 0..h * w {
            let p = f32::from(pixels.get(i * c + ch).copied().unwrap_or(0));
            out.push((p / spec.scale - mean) / std);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_gray_pixels() {
        let spec = InputSpec {
            name: "image".into(),
            shape: vec![-1, 1, 1, 2],
            dtype: "float32".into(),
            color: "gray".into(),
            scale: 255.0,
            mean: vec![0.5],
            std: vec![0.25],
        };
        let mut out = Vec::new();
        preprocess(&spec, &[0, 255], &mut out);
        assert_eq!(out, vec![-2.0, 2.0]);
    }

    #[test]
    fn deinterleaves_rgb() {
        let spec = InputSpec {
            name: "image".into(),
            shape: vec![-1, 3, 1, 2],
            dtype: "float32".into(),
            color: "rgb".into(),
            scale: 1.0,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        };
        let mut out = Vec::new();
        preprocess(&spec, &[1, 2, 3, 4, 5, 6], &mut out);
        assert_eq!(out, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
