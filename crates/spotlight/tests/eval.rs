//! `spotlight eval --limit N` runs the codecs as deployed and the image baselines, and writes
//! a report whose figures are real numbers; every lossy codec stays within its stated
//! accuracy bound against f32 on the sample.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn eval_on_a_sample_writes_the_report_and_keeps_every_codec_within_its_bound() {
    let dir = std::env::temp_dir().join(format!("spotlight-eval-test-{}", std::process::id()));
    let md = dir.join("codecs.md");
    let out = Command::new(env!("CARGO_BIN_EXE_spotlight"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["eval", "--limit", "300", "--no-progress", "--json", "--out"])
        .arg(&md)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spotlight eval failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(json["images"], 300);
    let report = std::fs::read_to_string(&md).unwrap();
    assert!(report.contains("| int4_per_channel | none |"), "{report}");
    let svg = std::fs::read_to_string(dir.join("codecs.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("PNG"), "{svg}");

    let rows = json["codecs"].as_array().unwrap();
    assert_eq!(rows.len(), 15, "5 codecs × 3 lossless stages");
    let row = |codec: &str, compression: &str| {
        rows.iter()
            .find(|r| r["codec"] == codec && r["compression"] == compression)
            .unwrap_or_else(|| panic!("no {codec} + {compression} row"))
    };
    let f32_acc = row("f32", "none")["accuracy"].as_f64().unwrap();
    assert!(f32_acc > 85.0, "f32 accuracy {f32_acc}");
    // Stated bounds on 300 images (one image is 0.33 pt): the per-tensor and per-channel
    // 8-bit codecs within 1 pt, int4 per channel within 1.5 pt.
    for (codec, bound, wire) in [
        ("f16", 0.5, 809.0),
        ("int8", 1.0, 427.0),
        ("int8_per_channel", 1.0, 451.0),
        ("int4_per_channel", 1.5, 255.0),
    ] {
        for compression in ["none", "lz4", "zstd"] {
            let r = row(codec, compression);
            let delta = r["delta_pt"].as_f64().unwrap();
            assert!(
                delta >= -bound,
                "{codec} + {compression}: {delta} pt against f32"
            );
            // A lossless stage never makes a frame bigger than the uncompressed form.
            let bytes = r["wire_bytes"].as_f64().unwrap();
            assert!(bytes <= wire + 1.0, "{codec} + {compression}: {bytes} B");
            assert!(r["encode_us"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["decode_us"].as_f64().unwrap() > 0.0, "{r}");
        }
        let plain = row(codec, "none")["wire_bytes"].as_f64().unwrap();
        assert!((plain - wire).abs() <= 1.0, "{codec}: {plain} B per frame");
    }
    // Lossless images give full.onnx the same pixels: the same accuracy as f32 features
    // (one image of slack for float differences between the graphs).
    let baselines = json["baselines"].as_array().unwrap();
    assert_eq!(baselines.len(), 5);
    for b in baselines {
        assert!(b["file_bytes"].as_f64().unwrap() > 100.0, "{b}");
        if b["format"] == "PNG" || b["format"] == "WebP lossless" {
            let d = b["delta_pt"].as_f64().unwrap();
            assert!(d.abs() <= 0.34, "{b}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
