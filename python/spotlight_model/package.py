"""Model package (spotlight.model/v1, see docs/model-package.md): export, hash, check, run."""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .model import NestedNet, nested_costs

SCHEMA = "spotlight.model/v1"
OPSET = 18
SEG_ID_RE = re.compile(r"^[a-z0-9_.-]+$")


# ---------------------------------------------------------------- content hash


def content_hash(pkg_dir: str | Path) -> str:
    pkg = Path(pkg_dir)
    files = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.onnx"))
    lines = "".join(f"{hashlib.sha256((pkg / rel).read_bytes()).hexdigest()} {rel}\n" for rel in files)
    return "sha256:" + hashlib.sha256(lines.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- ONNX export


class _SegWrap(nn.Module):
    def __init__(self, seg, has_feat: bool, has_logits: bool):
        super().__init__()
        self.seg, self.has_feat, self.has_logits = seg, has_feat, has_logits

    def forward(self, x, gain):
        f, lg = self.seg(x, gain)
        if self.has_feat and self.has_logits:
            return f, lg
        return f if self.has_feat else lg


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names) -> None:
    """Export with a dynamic batch axis (dim 0) on every input and output."""
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn_axes = {n: {0: "batch"} for n in list(input_names) + list(output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dyn_axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    import onnx
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    for vi in list(model.graph.input) + list(model.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        if d0.HasField("dim_value"):
            raise RuntimeError(f"{path}: {vi.name} has a fixed batch axis")


def export_package(model: NestedNet, out_dir: str | Path, *, name: str, mean, std,
                   image_shape, training: dict | None = None) -> dict:
    """Write backbone.onnx, segments/<id>.onnx, full.onnx and manifest.json. Returns manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # remove stale ONNX files so the content hash covers exactly this export
    for p in out.rglob("*.onnx"):
        p.unlink()
    model = model.eval().float()
    tree = model.tree
    c, h, w = image_shape
    img = torch.randn(2, c, h, w)
    costs = nested_costs(model, image_shape)

    _export(model.backbone, (img,), out / "backbone.onnx", ["image"], ["features"])
    with torch.no_grad():
        feats = model.backbone(img)
    feat_shape = [-1] + list(feats.shape[1:])

    seg_entries = []
    xs = {}
    for s in tree.segments:
        seg = model.segment(s.id)
        x = feats if s.parent is None else xs[s.parent]
        g = torch.ones(2, 1)
        with torch.no_grad():
            f, lg = seg(x, g)
        xs[s.id] = f
        has_feat, has_logits = bool(s.children), bool(s.direct_categories)
        outs = (["features"] if has_feat else []) + (["logits"] if has_logits else [])
        rel = f"segments/{s.id}.onnx"
        _export(_SegWrap(seg, has_feat, has_logits), (x, g), out / rel, ["x", "gain"], outs)
        seg_entries.append({
            "id": s.id,
            "parent": s.parent,
            "children": list(s.children),
            "file": rel,
            "input": {"name": "x", "shape": [-1] + list(x.shape[1:])},
            "gain_input": "gain",
            "features_output": {"name": "features", "shape": [-1] + list(f.shape[1:])} if has_feat else None,
            "logits_output": {"name": "logits", "shape": [-1, len(s.direct_categories)]} if has_logits else None,
            "direct_categories": list(s.direct_categories),
            "categories": list(s.categories),
            "params": costs[s.id]["params"],
            "macs": costs[s.id]["macs"],
        })

    gains = torch.ones(2, len(tree.segments))
    _export(model, (img, gains), out / "full.onnx", ["image", "gains"], ["logits"])

    manifest = {
        "schema": SCHEMA,
        "name": name,
        "created_by": f"spotlight_model {__version__}",
        "content_hash": content_hash(out),
        "input": {
            "name": "image",
            "shape": [-1, c, h, w],
            "dtype": "float32",
            "color": "gray" if c == 1 else "rgb",
            "scale": 255.0,
            "mean": list(mean),
            "std": list(std),
        },
        "categories": list(tree.categories),
        "backbone": {
            "file": "backbone.onnx",
            "input": "image",
            "output": "features",
            "output_shape": feat_shape,
            "params": costs["backbone"]["params"],
            "macs": costs["backbone"]["macs"],
        },
        "segments": seg_entries,
        "full": {"file": "full.onnx", "input": "image", "gains_input": "gains", "output": "logits"},
        "training": training or {},
    }
    with open(out / "manifest.json", "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    return manifest


# ---------------------------------------------------------------- schema check


def check_package(pkg_dir: str | Path) -> dict:
    """Validate manifest.json against the contract (keys, tree consistency, hash). Raises on error."""
    pkg = Path(pkg_dir)
    m = json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))

    def req(cond, msg):
        if not cond:
            raise ValueError(f"{pkg}: {msg}")

    for k in ("schema", "name", "created_by", "content_hash", "input", "categories", "backbone",
              "segments", "full", "training"):
        req(k in m, f"manifest missing key {k!r}")
    req(m["schema"] == SCHEMA, f"schema must be {SCHEMA}")
    req(re.fullmatch(r"sha256:[0-9a-f]{64}", m["content_hash"]) is not None, "bad content_hash format")
    req(m["content_hash"] == content_hash(pkg), "content_hash does not match the ONNX files")
    inp = m["input"]
    for k in ("name", "shape", "dtype", "color", "scale", "mean", "std"):
        req(k in inp, f"input missing {k!r}")
    req(inp["dtype"] == "float32", "input dtype must be float32")
    req(inp["color"] in ("gray", "rgb"), "input color must be gray|rgb")
    req(len(inp["shape"]) == 4 and inp["shape"][0] == -1, "input shape must be [-1,C,H,W]")
    nch = inp["shape"][1]
    req(len(inp["mean"]) == nch and len(inp["std"]) == nch, "mean/std length != channels")
    req(nch == (1 if inp["color"] == "gray" else 3), "color/channels mismatch")
    cats = m["categories"]
    req(isinstance(cats, list) and len(cats) > 0 and len(set(cats)) == len(cats), "bad categories")
    bb = m["backbone"]
    for k in ("file", "input", "output", "output_shape", "params", "macs"):
        req(k in bb, f"backbone missing {k!r}")
    req((pkg / bb["file"]).is_file(), "backbone file missing")
    req(bb["input"] == inp["name"], "backbone input name != input.name")
    segs = m["segments"]
    ids = [s["id"] for s in segs]
    req(len(set(ids)) == len(ids), "duplicate segment ids")
    pos = {sid: j for j, sid in enumerate(ids)}
    by = {s["id"]: s for s in segs}
    seen_direct: list[int] = []
    for j, s in enumerate(segs):
        for k in ("id", "parent", "children", "file", "input", "gain_input", "features_output",
                  "logits_output", "direct_categories", "categories", "params", "macs"):
            req(k in s, f"segment {s.get('id')} missing {k!r}")
        sid = s["id"]
        req(SEG_ID_RE.fullmatch(sid) is not None, f"bad segment id {sid}")
        req((pkg / s["file"]).is_file(), f"segment file {s['file']} missing")
        if s["parent"] is None:
            req("." not in sid, f"top-level id {sid} contains '.'")
            req(s["input"]["shape"] == bb["output_shape"], f"{sid}: input shape != backbone output")
        else:
            p = s["parent"]
            req(p in pos and pos[p] < j, f"{sid}: parent {p} must be listed before it")
            req(sid.startswith(p + ".") and "." not in sid[len(p) + 1:], f"{sid}: id must be parent.child")
            req(sid in by[p]["children"], f"{sid}: not in parent's children")
            req(by[p]["features_output"] is not None, f"{p}: has children but no features_output")
            req(s["input"]["shape"] == by[p]["features_output"]["shape"], f"{sid}: input shape != parent features")
        for ch in s["children"]:
            req(ch in by and by[ch]["parent"] == sid, f"{sid}: child {ch} inconsistent")
        req((s["features_output"] is not None) == bool(s["children"]), f"{sid}: features_output iff children")
        req((s["logits_output"] is not None) == bool(s["direct_categories"]), f"{sid}: logits_output iff direct categories")
        if s["logits_output"] is not None:
            req(s["logits_output"]["shape"] == [-1, len(s["direct_categories"])], f"{sid}: logits shape")
        req(s["input"]["shape"][0] == -1, f"{sid}: batch axis must be -1")
        seen_direct += s["direct_categories"]
        under = set(s["direct_categories"])
        for ch in s["children"]:
            under |= set(by[ch]["categories"])
        req(s["categories"] == sorted(under), f"{sid}: categories != union of subtree")
    req(sorted(seen_direct) == list(range(len(cats))), "every category must be direct in exactly one segment")
    fu = m["full"]
    for k in ("file", "input", "gains_input", "output"):
        req(k in fu, f"full missing {k!r}")
    req((pkg / fu["file"]).is_file(), "full file missing")
    return m


# ---------------------------------------------------------------- onnxruntime runner


class PackageRunner:
    """Runs a package with onnxruntime, either full.onnx or composed backbone + segments."""

    def __init__(self, pkg_dir: str | Path, threads: int = 2):
        import onnxruntime as ort
        self.dir = Path(pkg_dir)
        self.manifest = json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1

        def sess(rel):
            return ort.InferenceSession(str(self.dir / rel), opts, providers=["CPUExecutionProvider"])

        self.backbone = sess(self.manifest["backbone"]["file"])
        self.segments = {s["id"]: (s, sess(s["file"])) for s in self.manifest["segments"]}
        self._full = None
        self._sess = sess

    @property
    def full(self):
        if self._full is None:
            self._full = self._sess(self.manifest["full"]["file"])
        return self._full

    def preprocess(self, images_u8: np.ndarray) -> np.ndarray:
        inp = self.manifest["input"]
        x = images_u8.astype(np.float32) / np.float32(inp["scale"])
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        mean = np.asarray(inp["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(inp["std"], np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def run_full(self, x: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
        n = x.shape[0]
        if gains is None:
            gains = np.ones((n, len(self.manifest["segments"])), np.float32)
        fu = self.manifest["full"]
        return self.full.run([fu["output"]], {fu["input"]: x, fu["gains_input"]: gains.astype(np.float32)})[0]

    def run_backbone(self, x: np.ndarray) -> np.ndarray:
        bb = self.manifest["backbone"]
        return self.backbone.run([bb["output"]], {bb["input"]: x})[0]

    def run_segments(self, feats: np.ndarray, segment_ids=None, gains: dict | None = None):
        """Run the given segments (default: all) on bottleneck features, in manifest order.
        Returns {category index: logits column [N]} for the direct categories of those segments."""
        n = feats.shape[0]
        want = set(segment_ids) if segment_ids is not None else set(self.segments)
        outs: dict[str, np.ndarray] = {}
        cols: dict[int, np.ndarray] = {}
        for s in self.manifest["segments"]:
            sid = s["id"]
            if sid not in want:
                continue
            if s["parent"] is not None and s["parent"] not in outs:
                raise ValueError(f"segment {sid} needs its parent {s['parent']}")
            x = feats if s["parent"] is None else outs[s["parent"]]
            g = np.full((n, 1), 1.0, np.float32)
            if gains and sid in gains:
                g = np.asarray(gains[sid], np.float32).reshape(n, 1)
            names = []
            if s["features_output"] is not None:
                names.append(s["features_output"]["name"])
            if s["logits_output"] is not None:
                names.append(s["logits_output"]["name"])
            res = dict(zip(names, self.segments[sid][1].run(names, {s["input"]["name"]: x, s["gain_input"]: g})))
            if s["features_output"] is not None:
                outs[sid] = res[s["features_output"]["name"]]
            if s["logits_output"] is not None:
                lg = res[s["logits_output"]["name"]]
                for col, c in enumerate(s["direct_categories"]):
                    cols[c] = lg[:, col]
        return cols

    def composed_logits(self, x: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
        feats = self.run_backbone(x)
        g = None
        if gains is not None:
            g = {s["id"]: gains[:, j] for j, s in enumerate(self.manifest["segments"])}
        cols = self.run_segments(feats, gains=g)
        return np.stack([cols[c] for c in range(len(self.manifest["categories"]))], axis=1)

    def needed_segments(self, cats) -> list[str]:
        own = {c: s["id"] for s in self.manifest["segments"] for c in s["direct_categories"]}
        by = {s["id"]: s for s in self.manifest["segments"]}
        need = set()
        for c in cats:
            sid = own[int(c)]
            while sid is not None:
                need.add(sid)
                sid = by[sid]["parent"]
        return [s["id"] for s in self.manifest["segments"] if s["id"] in need]
