"""Package integrity (docs/model-package.md, "Content hash"): canonical JSON, the content hash,
per-file digests, and the check of the manifest's params/MACs against the ONNX graphs.

The Rust reader (crates/spotlight-model/src/integrity.rs) computes the same bytes; the shared
vectors in crates/spotlight-model/tests/data/canonical.json keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

# ---------------------------------------------------------------- canonical JSON

_I64_MIN, _U64_MAX = -(2 ** 63), 2 ** 64 - 1


def _number(x: float) -> str:
    """A finite double as ECMAScript's Number.prototype.toString writes it."""
    if not math.isfinite(x):
        raise ValueError(f"number {x!r} has no canonical form (NaN and infinities are not JSON)")
    if x == 0:
        return "0"
    # repr() writes the shortest digits that read back to the same double.
    mant, _, e = repr(abs(x)).partition("e")
    whole, _, frac = mant.partition(".")
    digits, exp10 = (whole + frac).lstrip("0"), int(e or 0) - len(frac)
    stripped = digits.rstrip("0")
    exp10 += len(digits) - len(stripped)
    digits = stripped
    k = len(digits)
    n = k + exp10  # x = 0.d1d2...dk * 10^n
    sign = "-" if x < 0 else ""
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * (-n) + digits
    e = n - 1
    return sign + digits[0] + ("." + digits[1:] if k > 1 else "") + ("e-" if e < 0 else "e+") + str(abs(e))


def canonical_json(value) -> str:
    """No whitespace; object members sorted by key (code point order); strings escaped as
    json.dumps(ensure_ascii=False) does; integers in decimal (64-bit range), other numbers as
    ECMAScript writes the double."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if not _I64_MIN <= value <= _U64_MAX:
            raise ValueError(f"integer {value} is outside the 64-bit range canonical JSON allows")
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise ValueError(f"object key {k!r} is not a string")
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + canonical_json(value[k])
                              for k in sorted(value)) + "}"
    raise ValueError(f"{type(value).__name__} is not a JSON value")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def content_hash(manifest: dict) -> str:
    """Digest of the canonical JSON of the manifest without its content_hash member."""
    rest = {k: v for k, v in manifest.items() if k != "content_hash"}
    return sha256_digest(canonical_json(rest).encode("utf-8"))


def file_digests(pkg_dir: str | Path) -> dict[str, str]:
    """{relative path: digest} of every *.onnx file of the package (the files the runtime reads)."""
    pkg = Path(pkg_dir)
    rels = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.onnx"))
    return {rel: sha256_digest((pkg / rel).read_bytes()) for rel in rels}


def seal(manifest: dict, pkg_dir: str | Path) -> dict:
    """Records the files' digests and the content hash in the manifest (in place) and returns it."""
    manifest["files"] = file_digests(pkg_dir)
    manifest["content_hash"] = content_hash(manifest)
    return manifest


def write_manifest(manifest: dict, pkg_dir: str | Path) -> None:
    with open(Path(pkg_dir) / "manifest.json", "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, allow_nan=False)
        fh.write("\n")


# ---------------------------------------------------------------- costs from the ONNX graphs

# The manifest's params are the PyTorch module's trainable parameters. The exporter folds each
# BatchNorm (eval mode) into the convolution before it: its scale and shift (2 per channel)
# become one conv bias per channel, so a graph may hold fewer parameters than the manifest
# states, by at most its number of conv-bias elements (one per folded channel); never more.
# For the shipped package the difference is exactly that number (0.2-0.4 % of each file).
# MACs count the same Conv/MatMul/Gemm work on both sides; they agree exactly today, and the
# check allows 0.1 %.
MACS_RTOL = 0.001


def onnx_costs(path: str | Path) -> dict:
    """Parameters (elements of the initializers and of their Identity copies; Constant nodes
    are axes and epsilons, not weights), per-sample MACs of the Conv, Gemm and MatMul nodes (read with the batch axis set
    to 1), and conv_bias: the elements of Conv biases (where a BatchNorm was folded in)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    # The exporter stores equal tensors once (an untrained model's folded BatchNorm biases are
    # all zeros) and names each other copy with an Identity node: each copy is a parameter
    # tensor of its own in PyTorch, so it counts.
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    params = sum(inits.values())
    conv_bias = sum(inits[n.input[2]] for n in model.graph.node
                    if n.op_type == "Conv" and len(n.input) > 2 and n.input[2] in inits)
    for vi in model.graph.input:
        dim0 = vi.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_param")
        dim0.dim_value = 1
    model = shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            shapes[node.output[0]] = list(numpy_helper.to_array(node.attribute[0].t).shape)

    def shape(name):
        if name not in shapes:
            raise ValueError(f"{path}: no static shape for {name!r}")
        return shapes[name]

    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = shape(node.input[1])  # [Cout, Cin/group, kh, kw]
            out = shape(node.output[0])
            macs += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a, out = shape(node.input[0]), shape(node.output[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            inner = a[-2] if trans_a else a[-1]
            macs += int(np.prod(out)) * inner
    return {"params": params, "macs": macs, "conv_bias": conv_bias}


def check_costs(pkg_dir: str | Path, manifest: dict | None = None, *, macs_rtol: float = MACS_RTOL) -> list[dict]:
    """Compares the params/MACs the manifest states for the backbone and each segment with
    onnx_costs of its file, and their sum with full.onnx: graph params must lie in
    [manifest - conv_bias, manifest] (BatchNorm folding, see above), graph MACs within macs_rtol
    of the manifest's. Raises ValueError naming every part out of tolerance; returns the rows."""
    pkg = Path(pkg_dir)
    m = manifest if manifest is not None else json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))
    parts = [("backbone", m["backbone"])] + [(s["id"], s) for s in m["segments"]]
    rows = []
    for name, spec in parts:
        got = onnx_costs(pkg / spec["file"])
        rows.append({"part": name, "file": spec["file"], "manifest_params": spec["params"],
                     "onnx_params": got["params"], "onnx_conv_bias": got["conv_bias"],
                     "manifest_macs": spec["macs"], "onnx_macs": got["macs"]})
    # a fused branch graph (manifest "branches") costs exactly the segments it fuses
    by_part = {r["part"]: r for r in rows}
    branch_rows = []
    for b in m.get("branches", []):
        got = onnx_costs(pkg / b["file"])
        of = [by_part[sid] for sid in b["segments"]]
        branch_rows.append({"part": f"branch {b['id']}", "file": b["file"],
                            "manifest_params": sum(r["manifest_params"] for r in of),
                            "onnx_params": got["params"], "onnx_conv_bias": got["conv_bias"],
                            "manifest_macs": sum(r["manifest_macs"] for r in of), "onnx_macs": got["macs"]})
    full = onnx_costs(pkg / m["full"]["file"])
    rows.append({"part": "full", "file": m["full"]["file"],
                 "manifest_params": sum(r["manifest_params"] for r in rows),
                 "onnx_params": full["params"], "onnx_conv_bias": full["conv_bias"],
                 "manifest_macs": sum(r["manifest_macs"] for r in rows), "onnx_macs": full["macs"]})
    rows[-1:-1] = branch_rows
    bad = []
    for r in rows:
        where = f"{r['part']} ({r['file']})"
        want, got, folded = r["manifest_params"], r["onnx_params"], r["onnx_conv_bias"]
        if not want - folded <= got <= want:
            bad.append(f"{where}: manifest params {want}, graph {got} with {folded} conv-bias "
                       f"elements (expected {want - folded}..{want})")
        want, got = r["manifest_macs"], r["onnx_macs"]
        r["macs_rel_diff"] = (got - want) / want if want else float(got != 0)
        if abs(r["macs_rel_diff"]) > macs_rtol:
            bad.append(f"{where}: manifest macs {want}, graph {got} ({100 * r['macs_rel_diff']:+.2f} %, "
                       f"tolerance {100 * macs_rtol:g} %)")
    if bad:
        raise ValueError(f"{pkg}: manifest costs disagree with the ONNX graphs: " + "; ".join(bad))
    return rows
