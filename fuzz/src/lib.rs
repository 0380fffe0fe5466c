//! Helpers shared by the fuzz targets: the shipped model, loaded once without ONNX Runtime.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use spotlight_model::{Manifest, Model};

/// The shipped package's manifest, compiled in so that a target does no IO per input.
pub const MANIFEST: &[u8] = include_bytes!("../../models/fashion-mnist-nested/manifest.json");

/// The shipped model (manifest parsed and validated; no ONNX file is opened).
pub fn model() -> &'static Arc<Model> {
    static MODEL: LazyLock<Arc<Model>> = LazyLock::new(|| {
        let manifest = Manifest::from_json(MANIFEST).expect("shipped manifest parses");
        let dir = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/fashion-mnist-nested"
        ));
        Arc::new(Model::from_manifest(dir, manifest).expect("shipped manifest is valid"))
    });
    &MODEL
}

/// A structure-aware mutation for JSON inputs (libFuzzer custom mutator): half of the time
/// libFuzzer's own byte mutation; otherwise, if `data[..size]` is JSON, one node of the tree
/// changes (a number to an edge value, an array emptied, shortened or grown, a string
/// replaced by another string of the document, a key dropped, a value nulled) and the tree is
/// written back. Byte mutations alone rarely turn valid JSON into valid-but-odd JSON.
pub fn mutate_json(data: &mut [u8], size: usize, max_size: usize, seed: u32) -> usize {
    let mut rng = Rng(u64::from(seed) | 1);
    let tree = if rng.below(2) == 0 {
        None
    } else {
        serde_json::from_slice::<serde_json::Value>(&data[..size]).ok()
    };
    let Some(mut tree) = tree else {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    };
    let mut strings = Vec::new();
    collect_strings(&tree, &mut strings);
    let nodes = count(&tree);
    let target = rng.below(nodes);
    mutate_node(&mut tree, &mut { target }, &strings, &mut rng);
    match serde_json::to_vec(&tree) {
        Ok(out) if out.len() <= max_size => {
            data[..out.len()].copy_from_slice(&out);
            out.len()
        }
        _ => libfuzzer_sys::fuzzer_mutate(data, size, max_size),
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

fn count(v: &serde_json::Value) -> usize {
    1 + match v {
        serde_json::Value::Array(a) => a.iter().map(count).sum(),
        serde_json::Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn collect_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// Mutates the `*target`-th node in pre-order; returns true once done.
fn mutate_node(
    v: &mut serde_json::Value,
    target: &mut usize,
    strings: &[String],
    rng: &mut Rng,
) -> bool {
    use serde_json::Value;
    if *target > 0 {
        *target -= 1;
        return match v {
            Value::Array(a) => a.iter_mut().any(|c| mutate_node(c, target, strings, rng)),
            Value::Object(o) => o.values_mut().any(|c| mutate_node(c, target, strings, rng)),
            _ => false,
        };
    }
    const NUMBERS: &[&str] = &[
        "0",
        "1",
        "-1",
        "2",
        "255",
        "256",
        "-2",
        "4294967296",
        "1099511627776",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "0.5",
        "-0.0",
        "1e39",
        "3.4e38",
        "1e-45",
    ];
    match (v, rng.below(4)) {
        (v @ Value::Number(_), _) => {
            *v = serde_json::from_str(NUMBERS[rng.below(NUMBERS.len())]).unwrap_or(Value::Null)
        }
        (Value::Array(a), 0) => a.clear(),
        (Value::Array(a), 1) if !a.is_empty() => {
            a.remove(rng.below(a.len()));
        }
        (Value::Array(a), _) if !a.is_empty() => {
            let c = a[rng.below(a.len())].clone();
            a.insert(rng.below(a.len() + 1), c);
        }
        (Value::String(s), 0) => s.clear(),
        (Value::String(s), _) if !strings.is_empty() => {
            *s = strings[rng.below(strings.len())].clone()
        }
        (Value::Object(o), 0 | 1) if !o.is_empty() => {
            let k = o
                .keys()
                .nth(rng.below(o.len()))
                .cloned()
                .unwrap_or_default();
            o.remove(&k);
        }
        (v, 2) => *v = Value::Null,
        (v @ (Value::Null | Value::Bool(_)), _) => *v = Value::Array(Vec::new()),
        _ => {}
    }
    true
}
