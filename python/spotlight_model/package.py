"""Model package (spotlight.model/v2, see docs/model-package.md): export, check, run."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .integrity import check_costs, content_hash, file_digests, seal, sha256_digest, write_manifest
from .model import GAIN_SEMANTICS, Backbone, NestedNet, nested_costs

SCHEMA = "spotlight.model/v2"
# What this reader accepts (docs/model-package.md, "Schema versions"). v1 packages (content hash
# over the ONNX files only) are refused; `remanifest` upgrades one in place.
SUPPORTED_SCHEMAS = (SCHEMA,)
UPGRADABLE_SCHEMAS = ("spotlight.model/v1",)
OPSET = 18
SEG_ID_RE = re.compile(r"^[a-z0-9_.-]+$")


class UnsupportedSchema(ValueError):
    pass


def check_schema(found) -> None:
    if found not in SUPPORTED_SCHEMAS:
        raise UnsupportedSchema(
            f"manifest schema {json.dumps(found)} is not supported; this reader accepts "
            f"{', '.join(SUPPORTED_SCHEMAS)}; re-export the package (`python -m spotlight_model export`), "
            f"or upgrade a {' / '.join(UPGRADABLE_SCHEMAS)} package in place, keeping its ONNX files "
            f"(`python -m spotlight_model remanifest --out <package dir>`)")


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


class _BranchWrap(nn.Module):
    """A top-level segment and everything nested under it as one graph: x and one gain per
    segment of the subtree (columns in manifest order) in, the logits of every segment of the
    subtree that has direct categories out (manifest order). The same arithmetic as running
    the segments one after another; one ONNX Runtime run instead of one per segment."""

    def __init__(self, model: NestedNet, ids: list[str]):
        super().__init__()
        self.model, self.ids = model, ids
        self.parent = {s.id: s.parent for s in model.tree.segments}

    def forward(self, x, gains):
        feats, logits = {}, []
        for j, sid in enumerate(self.ids):
            inp = x if j == 0 else feats[self.parent[sid]]
            f, lg = self.model.segment(sid)(inp, gains[:, j:j + 1])
            feats[sid] = f
            if lg is not None:
                logits.append(lg)
        return tuple(logits)


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

    # Each top-level segment with children also as one graph of its whole subtree
    # (manifest "branches"): a worker that runs the whole subtree for a batch runs it once.
    branch_entries = []
    for top in (s for s in tree.segments if s.parent is None and s.children):
        ids = [s.id for s in tree.segments if s.id == top.id or s.id.startswith(top.id + ".")]
        with_logits = [sid for sid in ids if tree.by_id()[sid].direct_categories]
        rel = f"branches/{top.id}.onnx"
        outs = [f"{sid}/logits" for sid in with_logits]
        _export(_BranchWrap(model, ids), (feats, torch.ones(2, len(ids))), out / rel, ["x", "gains"], outs)
        branch_entries.append({"id": top.id, "file": rel, "input": "x", "gains_input": "gains",
                               "segments": ids, "logits_outputs": dict(zip(with_logits, outs))})

    gains = torch.ones(2, len(tree.segments))
    _export(model, (img, gains), out / "full.onnx", ["image", "gains"], ["logits"])

    manifest = {
        "schema": SCHEMA,
        "name": name,
        "created_by": f"spotlight_model {__version__}",
        "content_hash": None,  # set by seal()
        "files": {},
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
        "gain": dict(GAIN_SEMANTICS),
        "backbone": {
            "file": "backbone.onnx",
            "input": "image",
            "output": "features",
            "output_shape": feat_shape,
            "output_range": list(Backbone.OUTPUT_RANGE),
            "params": costs["backbone"]["params"],
            "macs": costs["backbone"]["macs"],
        },
        "segments": seg_entries,
        "branches": branch_entries,
        "full": {"file": "full.onnx", "input": "image", "gains_input": "gains", "output": "logits"},
        "training": training or {},
    }
    seal(manifest, out)
    write_manifest(manifest, out)
    # what the manifest states is checked against what was written
    check_output_range(out, manifest)
    check_costs(out, manifest)
    check_gain_semantics(out)
    check_branches(out, manifest)
    return manifest


def check_branches(pkg_dir: str | Path, manifest: dict | None = None, n: int = 16, seed: int = 0) -> None:
    """Each fused branch graph gives the logits its segments give when run one after another
    (random bottleneck features in the declared range, random per-segment gains in [0, 3])."""
    runner = PackageRunner(pkg_dir, threads=1, manifest=manifest)
    m = runner.manifest
    lo, hi = m["backbone"]["output_range"]
    shape = [n] + m["backbone"]["output_shape"][1:]
    rng = np.random.default_rng(seed)
    by = {s["id"]: s for s in m["segments"]}
    for b in m.get("branches", []):
        top = by[b["segments"][0]]
        subtree = [s["id"] for s in m["segments"] if s["id"] == top["id"] or s["id"].startswith(top["id"] + ".")]
        if top["parent"] is not None or b["segments"] != subtree:
            raise ValueError(f"{pkg_dir}: branch {b['id']} must list a top-level segment and its whole "
                             f"subtree in manifest order ({subtree}), not {b['segments']}")
        feats = rng.uniform(lo, hi, size=shape).astype(np.float32)
        gains = rng.uniform(0.0, 3.0, size=(n, len(subtree))).astype(np.float32)
        sess = runner._sess(b["file"])
        names = list(b["logits_outputs"].values())
        got = dict(zip(b["logits_outputs"], sess.run(names, {b["input"]: feats, b["gains_input"]: gains})))
        cols = runner.run_segments(feats, subtree, {sid: gains[:, j] for j, sid in enumerate(subtree)})
        for sid, lg in got.items():
            want = np.stack([cols[c] for c in by[sid]["direct_categories"]], axis=1)
            if np.abs(lg - want).max() > 1e-4:
                raise ValueError(f"{pkg_dir}: branch {b['id']} output {sid} differs from the segments run "
                                 f"one after another by {np.abs(lg - want).max():.2e}")


def remanifest(pkg_dir: str | Path, log=print) -> dict:
    """Rewrites manifest.json of an existing package without touching its ONNX files: a v1
    manifest is upgraded to the current schema (gain semantics and bottleneck range added, each
    checked against the graphs first), then the file digests and the content hash are recomputed.
    The model card's header names the package's hash; it is updated in place."""
    pkg = Path(pkg_dir)
    old = json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))
    schema = old.get("schema")
    if schema not in SUPPORTED_SCHEMAS + UPGRADABLE_SCHEMAS:
        check_schema(schema)
    if schema in UPGRADABLE_SCHEMAS:
        m = {"schema": SCHEMA}
        for k, v in old.items():
            if k == "schema":
                continue
            m[k] = v
            if k == "content_hash":
                m["files"] = {}
            if k == "categories":
                m["gain"] = dict(GAIN_SEMANTICS)
        m["backbone"] = {**{k: v for k, v in old["backbone"].items() if k not in ("params", "macs")},
                         "output_range": list(Backbone.OUTPUT_RANGE),
                         "params": old["backbone"]["params"], "macs": old["backbone"]["macs"]}
    else:
        m = dict(old)
    check_output_range(pkg, m)
    check_costs(pkg, m)
    check_gain_semantics(pkg, m)
    seal(m, pkg)
    write_manifest(m, pkg)
    check_package(pkg)
    card = pkg / "model_card.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        new = text.replace(old.get("content_hash", "\0"), m["content_hash"])
        new = new.replace(f"(`{schema}`)", f"(`{SCHEMA}`)")
        if new != text:
            card.write_text(new, encoding="utf-8")
    log(f"{pkg}: {schema} -> {SCHEMA}, content hash {old.get('content_hash')} -> {m['content_hash']}")
    return m


def check_output_range(pkg_dir: str | Path, manifest: dict) -> None:
    """The range the manifest declares for the backbone output must be the tanh's, and the
    backbone graph must end in a Tanh."""
    import onnx
    bb = manifest["backbone"]
    graph = onnx.load(str(Path(pkg_dir) / bb["file"])).graph
    last = [n for n in graph.node if bb["output"] in n.output]
    tanh = list(Backbone.OUTPUT_RANGE)
    if not last or last[0].op_type != "Tanh" or bb.get("output_range") != tanh:
        raise ValueError(f"{pkg_dir}: the backbone output is not a tanh declared with range {tanh}; "
                         "re-export the package")


def check_gain_semantics(pkg_dir: str | Path, manifest: dict | None = None, n: int = 8, seed: int = 0) -> None:
    """Checks what manifest["gain"] declares against full.onnx on random inputs: gain 2 on a
    segment adds ln 2 to exactly the logits under it, and gain 0 on it leaves the others'
    softmax as if the segment were cut out."""
    runner = PackageRunner(pkg_dir, threads=1, manifest=manifest)
    m = runner.manifest
    if m.get("gain", GAIN_SEMANTICS) != GAIN_SEMANTICS:
        raise ValueError(f"{pkg_dir}: gain semantics {m.get('gain')} are not the ones this code checks "
                         f"({GAIN_SEMANTICS})")
    rng = np.random.default_rng(seed)
    c, h, w = m["input"]["shape"][1:]
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    k, segs = len(m["categories"]), m["segments"]
    base = runner.run_full(x)
    for j, s in enumerate(segs):
        under = s["categories"]
        rest = [ci for ci in range(k) if ci not in under]
        gains = np.ones((n, len(segs)), np.float32)
        gains[:, j] = 2.0
        d = runner.run_full(x, gains) - base
        if np.abs(d[:, under] - np.log(2.0)).max() > 1e-4 or (rest and np.abs(d[:, rest]).max() > 1e-4):
            raise ValueError(f"{pkg_dir}: gain 2 on segment {s['id']} does not add ln 2 to exactly the "
                             "logits under it, as logit_effect adds_log_gain says")
        if rest:
            gains[:, j] = 0.0
            z = runner.run_full(x, gains).astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            zr = base[:, rest].astype(np.float64)
            zr -= zr.max(axis=1, keepdims=True)
            pr = np.exp(zr) / np.exp(zr).sum(axis=1, keepdims=True)
            # the cut-out categories keep ~1e-12 of probability mass, about 1e-11 in all
            if p[:, under].max() > 1e-6 or np.abs(p[:, rest] - pr).max() > 1e-5:
                raise ValueError(f"{pkg_dir}: gain 0 on segment {s['id']} is not a cutout, as "
                                 "zero_is_cutout says")


# ---------------------------------------------------------------- schema check


def check_package(pkg_dir: str | Path) -> dict:
    """Validate manifest.json against the contract (keys, tree consistency, hash). Raises on error."""
    pkg = Path(pkg_dir)
    m = json.loads((pkg / "manifest.json").read_text(encoding="utf-8"))

    def req(cond, msg):
        if not cond:
            raise ValueError(f"{pkg}: {msg}")

    try:
        check_schema(m.get("schema"))
    except UnsupportedSchema as e:
        raise UnsupportedSchema(f"{pkg}: {e}") from None
    for k in ("schema", "name", "created_by", "content_hash", "files", "input", "categories", "gain",
              "backbone", "segments", "full", "training"):
        req(k in m, f"manifest missing key {k!r}")
    req(isinstance(m["content_hash"], str) and re.fullmatch(r"sha256:[0-9a-f]{64}", m["content_hash"]) is not None,
        "bad content_hash format")
    actual = content_hash(m)
    req(m["content_hash"] == actual,
        f"content_hash {m['content_hash']} does not match the manifest's content, which hashes to {actual}")
    files = m["files"]
    on_disk = file_digests(pkg)
    for rel in on_disk:
        req(rel in files, f"{rel} is in the package but not listed in files")
    for rel, digest in files.items():
        req(re.fullmatch(r"[^/\\]+(/[^/\\]+)*", rel) is not None and ".." not in rel.split("/")
            and "." not in rel.split("/"), f"files lists {rel!r}, not a plain relative path")
        req((pkg / rel).is_file(), f"{rel} is listed in files but missing")
        got = on_disk.get(rel) or sha256_digest((pkg / rel).read_bytes())
        req(got == digest, f"{rel} hashes to {got}, manifest.json lists {digest}")
    req(m["gain"] == GAIN_SEMANTICS, f"gain semantics {m['gain']} unknown; this reader knows {GAIN_SEMANTICS}")
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
    for k in ("file", "input", "output", "output_shape", "output_range", "params", "macs"):
        req(k in bb, f"backbone missing {k!r}")
    lo_hi = bb["output_range"]
    req(isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi)
        and lo_hi[0] < lo_hi[1], "backbone output_range must be [low, high] with low < high")
    for rel in [bb["file"], m["full"]["file"]] + [s["file"] for s in m["segments"]]:
        req(rel in files, f"{rel} is used by the manifest but not listed in files")
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

    def __init__(self, pkg_dir: str | Path, threads: int = 2, manifest: dict | None = None):
        import onnxruntime as ort
        self.dir = Path(pkg_dir)
        self.manifest = manifest if manifest is not None else \
            json.loads((self.dir / "manifest.json").read_text(encoding="utf-8"))
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
