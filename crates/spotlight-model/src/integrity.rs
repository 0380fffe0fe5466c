//! Package integrity: the canonical JSON of a manifest, its content hash, and the check that
//! every file of a package is the one the manifest lists. `docs/model-package.md` ("Content
//! hash") defines both; `python/spotlight_model/integrity.py` computes the same bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::{Manifest, ModelError};

/// `sha256:` followed by the lowercase hex SHA-256 of `bytes`, the form of every digest in a
/// manifest (`content_hash` and the values of `files`).
pub fn sha256_digest(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in Sha256::digest(bytes) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The content hash of a manifest given as JSON text: the digest of the canonical JSON of the
/// manifest without its `content_hash` member. Every other member counts, `files` included,
/// so the hash covers the category order, the normalisation, the tree, the tensor specs, the
/// gain semantics and, through the per-file digests, every file.
pub fn content_hash(manifest_json: &str) -> Result<String, ModelError> {
    let mut members: BTreeMap<String, &RawValue> =
        serde_json::from_str(manifest_json).map_err(|e| invalid(format!("{e}")))?;
    members.remove("content_hash");
    let mut out = String::new();
    write_object(&mut out, &members)?;
    Ok(sha256_digest(out.as_bytes()))
}

/// The canonical form of the JSON text `json`: no whitespace, object members sorted by key
/// (code point order), strings escaped as `docs/model-package.md` says, integers in decimal and
/// other numbers as ECMAScript's `Number.prototype.toString` writes the nearest double.
pub fn canonical_json(json: &str) -> Result<String, ModelError> {
    let raw: &RawValue = serde_json::from_str(json).map_err(|e| invalid(format!("{e}")))?;
    let mut out = String::new();
    write_raw(&mut out, raw)?;
    Ok(out)
}

fn invalid(why: String) -> ModelError {
    ModelError::Invalid(format!("manifest has no canonical form: {why}"))
}

/// Writes one JSON value from its text. Containers are read one level at a time as raw
/// values, so every number is read from its own digits: serde_json's default float parser
/// can land one ulp off the nearest double, `str::parse` does not.
fn write_raw(out: &mut String, raw: &RawValue) -> Result<(), ModelError> {
    let text = raw.get();
    let parse_err = |e: serde_json::Error| invalid(format!("{e}"));
    match text.as_bytes().first() {
        Some(b'{') => {
            let members: BTreeMap<String, &RawValue> =
                serde_json::from_str(text).map_err(parse_err)?;
            write_object(out, &members)?;
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(parse_err)?;
            out.push('[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_raw(out, item)?;
            }
            out.push(']');
        }
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(parse_err)?;
            write_string(out, &s);
        }
        Some(b't' | b'f' | b'n') => out.push_str(text),
        _ => out.push_str(&number(text)?),
    }
    Ok(())
}

/// Members in key order: a `BTreeMap<String, _>` orders by UTF-8 bytes, which is code point
/// order (a key given twice keeps its last value, as in Python).
fn write_object(out: &mut String, members: &BTreeMap<String, &RawValue>) -> Result<(), ModelError> {
    out.push('{');
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_raw(out, value)?;
    }
    out.push('}');
    Ok(())
}

/// A JSON number token: without fraction or exponent an integer, which must fit in 64 bits;
/// otherwise the nearest double, written as ECMAScript does.
fn number(token: &str) -> Result<String, ModelError> {
    if !token.contains(['.', 'e', 'E']) {
        if let Ok(u) = token.parse::<u64>() {
            return Ok(u.to_string());
        }
        return token
            .parse::<i64>()
            .map(|i| i.to_string())
            .map_err(|_| invalid(format!("integer {token} does not fit in 64 bits")));
    }
    token
        .parse::<f64>()
        .ok()
        .and_then(ecmascript_number)
        .ok_or_else(|| invalid(format!("number {token} is not a finite double")))
}

/// `"` and `\` escaped, the five short control escapes, other control characters as
/// `\u00xx`; everything else as it is (UTF-8).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A finite double as ECMAScript's `Number.prototype.toString` writes it (shortest digits
/// that read back to the same double); `None` for NaN and the infinities.
fn ecmascript_number(x: f64) -> Option<String> {
    if !x.is_finite() {
        return None;
    }
    if x == 0.0 {
        return Some("0".into());
    }
    // Rust's `{:e}` writes the shortest round-trip digits: "2.862e-1", "1e21".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e')?;
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i64 = exp.parse().ok()?;
    let k = digits.len() as i64;
    let n = exp + 1; // x = 0.d1d2…dk × 10^n
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    Some(out)
}

/// Checks a package against its manifest (`manifest_json` is the text of `manifest.json`,
/// `manifest` the same parsed): the content hash, then that every file the manifest names and
/// every `*.onnx` file in the directory is listed in `files`, then each listed file's digest.
pub fn verify_package(
    dir: &Path,
    manifest_json: &str,
    manifest: &Manifest,
) -> Result<(), ModelError> {
    let actual = content_hash(manifest_json)?;
    if actual != manifest.content_hash {
        return Err(ModelError::HashMismatch {
            dir: dir.to_path_buf(),
            manifest: manifest.content_hash.clone(),
            actual,
        });
    }
    for file in manifest.files.keys() {
        if !is_plain_relative(file) {
            return Err(ModelError::Invalid(format!(
                "files lists \"{file}\"; expected a relative path with '/' separators inside the package"
            )));
        }
    }
    let named = std::iter::once(&manifest.backbone.file)
        .chain(std::iter::once(&manifest.full.file))
        .chain(manifest.segments.iter().map(|s| &s.file))
        .chain(manifest.branches.iter().map(|b| &b.file));
    for file in named {
        if !manifest.files.contains_key(file) {
            return Err(ModelError::Invalid(format!(
                "file \"{file}\" is used by the manifest but not listed in its files"
            )));
        }
    }
    let mut on_disk = Vec::new();
    collect_onnx(dir, dir, &mut on_disk)?;
    if let Some(file) = on_disk.iter().find(|f| !manifest.files.contains_key(*f)) {
        return Err(ModelError::UnlistedFile {
            dir: dir.to_path_buf(),
            file: file.clone(),
        });
    }
    for (file, expected) in &manifest.files {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| ModelError::Io { path, source })?;
        let actual = sha256_digest(&bytes);
        if &actual != expected {
            return Err(ModelError::FileHashMismatch {
                dir: dir.to_path_buf(),
                file: file.clone(),
                manifest: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// `a/b.onnx`: no root, no `.` or `..`, no empty part, no backslash.
fn is_plain_relative(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && file.split('/').all(|p| !p.is_empty())
        && Path::new(file)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Every `*.onnx` file under `dir`, as a path relative to `root` with `/` separators.
fn collect_onnx(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), ModelError> {
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir.to_path_buf()))? {
        entries.push(entry.map_err(io(dir.to_path_buf()))?.path());
    }
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_onnx(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "onnx") {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let parts: Vec<_> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_ecmascript_does() {
        let cases: &[(f64, &str)] = &[
            (0.2862, "0.2862"),
            (255.0, "255"),
            (-1.0, "-1"),
            (-0.0, "0"),
            (1e-12, "1e-12"),
            (1e-7, "1e-7"),
            (1.5e-6, "0.0000015"),
            (123.456, "123.456"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (0.9398000240325928, "0.9398000240325928"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (0.1 + 0.2, "0.30000000000000004"),
        ];
        for &(x, want) in cases {
            assert_eq!(ecmascript_number(x).as_deref(), Some(want), "{x:e}");
        }
        assert_eq!(ecmascript_number(f64::NAN), None);
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let text = r#"{"b": [1, 2.0, -3, -0, {"z": null, "a": true}], "a": "x\"y\\\n\u0001é\/", "A": 1.5e0}"#;
        assert_eq!(
            canonical_json(text).unwrap(),
            "{\"A\":1.5,\"a\":\"x\\\"y\\\\\\n\\u0001é/\",\"b\":[1,2,-3,0,{\"a\":true,\"z\":null}]}"
        );
        for bad in [
            "18446744073709551616",
            "-9223372036854775809",
            "1e400",
            "[1,",
        ] {
            assert!(canonical_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_are_read_from_their_digits() {
        // serde_json's default parser reads this one ulp below the nearest double
        // (-6.3603751849933156e38); the canonical form must not.
        assert_eq!(
            canonical_json("-6.360375184993316e+38").unwrap(),
            "-6.360375184993316e+38"
        );
    }

    #[test]
    fn the_content_hash_ignores_only_itself_and_layout() {
        let a =
            r#"{"content_hash": "sha256:00", "categories": ["x", "y"], "input": {"mean": [0.5]}}"#;
        let b = "{\"input\" : {\"mean\":[5e-1]},\n \"categories\":[\"x\",\"y\"], \"content_hash\": \"other\"}";
        assert_eq!(content_hash(a).unwrap(), content_hash(b).unwrap());
        let swapped =
            r#"{"content_hash": "sha256:00", "categories": ["y", "x"], "input": {"mean": [0.5]}}"#;
        assert_ne!(content_hash(a).unwrap(), content_hash(swapped).unwrap());
        assert!(content_hash("[1]").is_err());
    }

    #[test]
    fn only_plain_relative_paths_are_listed() {
        for ok in ["full.onnx", "segments/tops.light.onnx"] {
            assert!(is_plain_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x.onnx",
            "a/../b.onnx",
            "./a.onnx",
            "a//b.onnx",
            "a\\b.onnx",
        ] {
            assert!(!is_plain_relative(bad), "{bad}");
        }
    }
}
