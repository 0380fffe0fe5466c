"""Test-set evaluation of a model package (+ the baseline checkpoint) -> model_card.md + JSON.

The test split is used here only. All nested-model numbers are computed with onnxruntime on
the exported package, composing backbone + the needed segments per the manifest (the cutout).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import load_dataset, to_nchw_float
from .package import PackageRunner, check_package
from .tree import parse_tree

PAPER_BEST = {"params_excluded": 73.48, "gmacs_excluded": 84.41}
ENHANCE_GAINS = [1.25, 1.5, 2.0, 4.0]
INHIBIT_GAINS = [0.5, 0.25, 0.0]
NOISY = [(0.8, 2.0), (0.6, 2.0)]


def png_size(img: np.ndarray) -> int:
    """Size in bytes of a minimal 8-bit grayscale (or RGB) PNG of img (filter 0, zlib level 9)."""
    h, w = img.shape[:2]
    color = 0 if img.ndim == 2 else 2
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return len(png)


def quantize_int8(f: np.ndarray) -> np.ndarray:
    """Per-tensor affine int8 over the tanh range [-1, 1] (256 levels), dequantised."""
    q = np.clip(np.round((f + 1.0) * 127.5), 0, 255)
    return (q / 127.5 - 1.0).astype(np.float32)


def _acc(pred, y) -> float:
    return float((pred == y).mean())


def evaluate(pkg_dir: Path, work: Path, data: str | None, threads: int = 2,
             results_path: Path | None = None, tree_path: Path | None = None, batch: int = 1000,
             log=print) -> dict:
    t_start = time.time()
    manifest = check_package(pkg_dir)
    runner = PackageRunner(pkg_dir, threads=threads)
    cats = manifest["categories"]
    segs = manifest["segments"]
    by = {s["id"]: s for s in segs}
    k = len(cats)

    ckpt = None
    nested_ckpt = work / "nested.pt"
    if nested_ckpt.exists():
        ckpt = torch.load(nested_ckpt, map_location="cpu", weights_only=False)
    tree_src = None
    repo = Path(__file__).resolve().parents[2]
    for cand in ([tree_path] if tree_path else []) + ([repo / ckpt["tree_file"]] if ckpt else []):
        if cand and Path(cand).is_file():
            tree_src = json.loads(Path(cand).read_text(encoding="utf-8"))
            break
    if tree_src is None and ckpt:
        tree_src = ckpt["tree"]
    tree = parse_tree(tree_src) if tree_src else None
    if tree is not None and [s.id for s in tree.segments] != [s["id"] for s in segs]:
        log("warning: tree file does not match the package; using package structure only")
        tree = None

    ds = load_dataset(data)
    y = ds.test_labels
    n = len(y)
    x = runner.preprocess(ds.test_images)

    baseline_path = work / "baseline.pt"
    n_steps = 2 * ((n + batch - 1) // batch) + 1 + 20 + 4 + (1 if baseline_path.exists() else 0)
    bar = tqdm(total=n_steps, desc="evaluate", file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 20.0)

    # ---- backbone features (cached) + full.onnx
    feats, full_logits = [], []
    for i in range(0, n, batch):
        feats.append(runner.run_backbone(x[i:i + batch])); bar.update()
    for i in range(0, n, batch):
        full_logits.append(runner.run_full(x[i:i + batch])); bar.update()
    feats = np.concatenate(feats)
    full_logits = np.concatenate(full_logits)

    def seg_logits(f, seg_ids=None, gains=None):
        cols = runner.run_segments(f, seg_ids, gains)
        return cols

    cols = seg_logits(feats); bar.update()
    logits = np.stack([cols[c] for c in range(k)], axis=1)
    composed_vs_full = float(np.abs(logits - full_logits).max())
    pred = logits.argmax(1)
    nested_acc = _acc(pred, y)
    conf = np.zeros((k, k), np.int64)
    np.add.at(conf, (y, pred), 1)

    # ---- costs
    bb_p, bb_m = manifest["backbone"]["params"], manifest["backbone"]["macs"]
    cloud_p = sum(s["params"] for s in segs)
    cloud_m = sum(s["macs"] for s in segs)

    def cost_row(seg_ids):
        p = sum(by[s]["params"] for s in seg_ids)
        m = sum(by[s]["macs"] for s in seg_ids)
        return {"cloud_params": p, "cloud_macs": m, "total_params": bb_p + p, "total_macs": bb_m + m,
                "cloud_params_excluded_pct": 100 * (1 - p / cloud_p),
                "cloud_macs_excluded_pct": 100 * (1 - m / cloud_m),
                "total_params_excluded_pct": 100 * (1 - (bb_p + p) / (bb_p + cloud_p)),
                "total_macs_excluded_pct": 100 * (1 - (bb_m + m) / (bb_m + cloud_m))}

    # ---- tasks (cutout)
    tasks = []
    tops = [s for s in segs if s["parent"] is None]
    leaves = [s for s in segs if not s["children"]]
    for s in tops:
        tasks.append({"name": s["id"], "kind": "top-level group" + (" (leaf)" if not s["children"] else ""),
                      "categories": s["categories"]})
    for s in leaves:
        if s["parent"] is not None:
            tasks.append({"name": s["id"], "kind": "leaf group", "categories": s["categories"]})
    for t in (tree.source.get("eval_tasks", []) if tree else []):
        cs = set()
        for cname in t.get("categories", []):
            cs.add(cats.index(cname))
        for g in t.get("groups", []):
            cs |= set(by[g]["categories"])
        tasks.append({"name": t["name"], "kind": "mixed", "categories": sorted(cs)})
    tasks.append({"name": "all categories", "kind": "full model", "categories": list(range(k))})
    for t in tasks:
        need = runner.needed_segments(t["categories"])
        mask = np.isin(y, t["categories"])
        c = seg_logits(feats[mask], need)
        sub = np.stack([c[ci] for ci in t["categories"]], axis=1)
        tpred = np.asarray(t["categories"])[sub.argmax(1)]
        t.update({"segments": need, "n_images": int(mask.sum()), "accuracy": _acc(tpred, y[mask]),
                  "category_names": [cats[ci] for ci in t["categories"]], **cost_row(need)})
        # same task with the full model restricted to the relevant logits (must agree)
        full_sub = full_logits[mask][:, t["categories"]]
        t["accuracy_full_model_restricted"] = _acc(np.asarray(t["categories"])[full_sub.argmax(1)], y[mask])
    bar.update(20 - 0)

    # ---- top-down attention
    top_of = {}
    for s in tops:
        for ci in s["categories"]:
            top_of[ci] = s["id"]
    top_ids = [s["id"] for s in tops]
    true_top = np.array([top_ids.index(top_of[int(ci)]) for ci in y])
    rng = np.random.default_rng(1234)

    def run_with_top_gains(gmat):  # gmat [N, n_tops]
        g = {sid: gmat[:, j] for j, sid in enumerate(top_ids)}
        c = seg_logits(feats, None, g)
        return _acc(np.stack([c[ci] for ci in range(k)], axis=1).argmax(1), y)

    attention = [{"signal": "none", "gain": 1.0, "accuracy": nested_acc}]
    for g in ENHANCE_GAINS:
        gm = np.ones((n, len(top_ids)), np.float32)
        gm[np.arange(n), true_top] = g
        attention.append({"signal": "enhance true top-level group", "gain": g, "accuracy": run_with_top_gains(gm)})
    bar.update()
    for g in INHIBIT_GAINS:
        gm = np.full((n, len(top_ids)), g, np.float32)
        gm[np.arange(n), true_top] = 1.0
        attention.append({"signal": "inhibit wrong top-level groups", "gain": g, "accuracy": run_with_top_gains(gm)})
    bar.update()
    for p_right, g in NOISY:
        named = true_top.copy()
        wrong = rng.random(n) >= p_right
        if len(top_ids) > 1:
            off = rng.integers(1, len(top_ids), size=n)
            named[wrong] = (true_top[wrong] + off[wrong]) % len(top_ids)
        gm = np.ones((n, len(top_ids)), np.float32)
        gm[np.arange(n), named] = g
        attention.append({"signal": f"noisy enhance ({int(p_right * 100)} % right)", "gain": g,
                          "signal_correct_fraction": float((named == true_top).mean()),
                          "accuracy": run_with_top_gains(gm)})
    bar.update()

    # ---- bottleneck size + int8
    fshape = manifest["backbone"]["output_shape"][1:]
    nvals = int(np.prod(fshape))
    pngs = np.array([png_size(im) for im in ds.test_images])
    cq = seg_logits(quantize_int8(feats))
    int8_acc = _acc(np.stack([cq[ci] for ci in range(k)], axis=1).argmax(1), y)
    bar.update()

    # ---- baseline
    baseline = None
    if baseline_path.exists():
        from .cli import load_checkpoint
        from .model import baseline_costs
        from .train import predict_logits
        bmodel, bck = load_checkpoint(work, "baseline")
        bl = predict_logits(bmodel, torch.from_numpy(to_nchw_float(ds.test_images)), bck["mean"], bck["std"])
        bpred = bl.argmax(1).numpy()
        bconf = np.zeros((k, k), np.int64)
        np.add.at(bconf, (y, bpred), 1)
        baseline = {"accuracy": _acc(bpred, y), "costs": baseline_costs(bmodel, tuple(bck["image_shape"])),
                    "val_acc": bck.get("val_acc"), "selected_epoch": bck.get("selected_epoch"),
                    "train_seconds": bck.get("train_seconds"), "epochs": bck["hparams"]["epochs"],
                    "history": bck.get("history"), "confusion": bconf.tolist()}
        bar.update()
    bar.close()

    results = {
        "package": manifest["name"], "content_hash": manifest["content_hash"],
        "test_images": int(n), "dataset": Path(ds.source).name,
        "nested": {"accuracy": nested_acc, "composed_vs_full_max_abs_diff": composed_vs_full,
                   "costs": {"edge": {"params": bb_p, "macs": bb_m},
                             "cloud": {"params": cloud_p, "macs": cloud_m},
                             "total": {"params": bb_p + cloud_p, "macs": bb_m + cloud_m}},
                   "confusion": conf.tolist(),
                   "val_acc": ckpt.get("val_acc") if ckpt else None,
                   "selected_epoch": ckpt.get("selected_epoch") if ckpt else None,
                   "train_seconds": ckpt.get("train_seconds") if ckpt else None,
                   "epochs": ckpt["hparams"]["epochs"] if ckpt else None,
                   "history": ckpt.get("history") if ckpt else None},
        "baseline": baseline,
        "tasks": tasks,
        "attention": attention,
        "bottleneck": {"shape": fshape, "values": nvals, "bytes_fp32": 4 * nvals, "bytes_int8": nvals,
                       "png_mean_bytes": float(pngs.mean()), "png_median_bytes": float(np.median(pngs)),
                       "raw_image_bytes": int(np.prod(ds.test_images.shape[1:])),
                       "int8_accuracy": int8_acc, "fp32_accuracy": nested_acc},
        "paper_best_case": PAPER_BEST,
        "eval_seconds": round(time.time() - t_start, 1),
    }
    if results_path is None:
        results_path = work / "results.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    card = render_card(results, manifest, tree)
    (Path(pkg_dir) / "model_card.md").write_text(card, encoding="utf-8")
    log(summary(results))
    log(f"results -> {results_path}\nmodel card -> {Path(pkg_dir) / 'model_card.md'}")
    return results


# ---------------------------------------------------------------- rendering


def _pct(v) -> str:
    return f"{100 * v:.2f} %"


def summary(r: dict) -> str:
    lines = [f"nested test accuracy {_pct(r['nested']['accuracy'])}"]
    if r["baseline"]:
        lines.append(f"baseline test accuracy {_pct(r['baseline']['accuracy'])}")
    for t in r["tasks"]:
        lines.append(f"  task {t['name']:<32} acc {_pct(t['accuracy']):>9}  cloud params excl "
                     f"{t['cloud_params_excluded_pct']:5.1f} %  cloud MACs excl {t['cloud_macs_excluded_pct']:5.1f} %")
    for a in r["attention"]:
        lines.append(f"  attention {a['signal']:<34} gain {a['gain']:<5} acc {_pct(a['accuracy'])}")
    b = r["bottleneck"]
    lines.append(f"bottleneck {b['bytes_int8']} B int8 / {b['bytes_fp32']} B fp32 vs PNG mean {b['png_mean_bytes']:.0f} B;"
                 f" int8 accuracy {_pct(b['int8_accuracy'])}")
    lines.append("confusion (rows = true, cols = predicted):")
    for row in r["nested"]["confusion"]:
        lines.append("  " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def _fmt_int(v) -> str:
    return f"{v:,}".replace(",", " ")


def render_card(r: dict, m: dict, tree) -> str:
    cats = m["categories"]
    nest, base = r["nested"], r["baseline"]
    L = []
    L.append(f"# Model card: {m['name']}\n")
    L.append(f"Package `{m['name']}` (`{m['schema']}`), content hash `{m['content_hash']}`. "
             f"Written by `python -m spotlight_model evaluate`; all numbers below are on the "
             f"{r['dataset']} **test split** ({r['test_images']} images), which is used only here. "
             f"Checkpoints were selected on a validation split held out from the training images.\n")
    L.append("Architecture: our interpretation of Kelm et al., *High-Level Parallelism and Nested Features "
             "for Dynamic Inference Cost and Top-Down Attention* (arXiv 2308.05128): a shared backbone "
             "(edge) ends in a tanh-bounded bottleneck; a tree of parallel high-level segments (cloud) "
             "scores the categories. Nested segments are positively homogeneous (bias-free conv + ReLU), "
             "and heads use `logit = scale*<w,phi>/|phi| + log|phi|`, so a gain g on a segment adds "
             "log g to every logit below it (see docs/model-package.md).\n")

    L.append("## Category tree\n")
    for s in m["segments"]:
        depth = s["id"].count(".")
        direct = ", ".join(cats[c] for c in s["direct_categories"])
        L.append(f"{'  ' * depth}- `{s['id']}`" + (f": {direct}" if direct else ""))
    L.append("")
    if tree is not None and tree.reason:
        L.append(f"Why: {tree.reason}\n")

    # confusion evidence
    conf = np.asarray(nest["confusion"])
    errs = conf.sum() - np.trace(conf)
    top_of = {}
    for s in m["segments"]:
        if s["parent"] is None:
            for c in s["categories"]:
                top_of[c] = s["id"]
    within = sum(conf[i, j] for i in range(len(cats)) for j in range(len(cats))
                 if i != j and top_of[i] == top_of[j])
    off = [(conf[i, j], i, j) for i in range(len(cats)) for j in range(len(cats)) if i != j]
    off.sort(reverse=True)
    L.append("### Confusion matrix (nested model, test; rows = true, columns = predicted)\n")
    L.append("| true \\ pred | " + " | ".join(cats) + " |")
    L.append("|---|" + "---:|" * len(cats))
    for i, row in enumerate(conf):
        L.append(f"| {cats[i]} | " + " | ".join(str(v) for v in row) + " |")
    L.append("")
    L.append(f"{errs} errors in total; {within} of them ({100 * within / max(errs, 1):.1f} %) are between "
             f"categories of the same top-level group. Largest confusions: "
             + "; ".join(f"{cats[i]} -> {cats[j]}: {v}" for v, i, j in off[:6]) + ".\n")
    if base:
        bconf = np.asarray(base["confusion"])
        berr = bconf.sum() - np.trace(bconf)
        bwithin = sum(bconf[i, j] for i in range(len(cats)) for j in range(len(cats))
                      if i != j and top_of[i] == top_of[j])
        L.append(f"Baseline (no tree): {berr} errors, {bwithin} ({100 * bwithin / max(berr, 1):.1f} %) "
                 f"within a top-level group of this tree.\n")

    L.append("## Accuracy and size\n")
    L.append("| model | test accuracy | edge params | edge MACs | cloud params | cloud MACs | total params | total MACs |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    c = nest["costs"]
    L.append(f"| nested (this package) | {_pct(nest['accuracy'])} | {_fmt_int(c['edge']['params'])} | "
             f"{_fmt_int(c['edge']['macs'])} | {_fmt_int(c['cloud']['params'])} | {_fmt_int(c['cloud']['macs'])} | "
             f"{_fmt_int(c['total']['params'])} | {_fmt_int(c['total']['macs'])} |")
    if base:
        c = base["costs"]
        L.append(f"| baseline (same backbone, conventional head) | {_pct(base['accuracy'])} | "
                 f"{_fmt_int(c['edge']['params'])} | {_fmt_int(c['edge']['macs'])} | {_fmt_int(c['cloud']['params'])} | "
                 f"{_fmt_int(c['cloud']['macs'])} | {_fmt_int(c['total']['params'])} | {_fmt_int(c['total']['macs'])} |")
    L.append("")
    if base:
        d = 100 * (nest["accuracy"] - base["accuracy"])
        L.append(f"Nested minus baseline: {d:+.2f} points. MACs are per image, conv/linear layers only.\n")
    tr = m.get("training", {})
    L.append(f"Training (both models identical recipe): {nest.get('epochs')} epochs, AdamW + one-cycle LR "
             f"(max lr {tr.get('lr')}, weight decay {tr.get('weight_decay')}), batch {tr.get('batch_size')}, "
             f"label smoothing {tr.get('label_smoothing')}, random shift (pad 2 + crop) and horizontal flip, "
             f"seed {tr.get('seed')}; {tr.get('train_size')} training / {tr.get('val_size')} validation images. "
             f"Selected epoch (by validation accuracy): nested {nest.get('selected_epoch')} "
             f"(val {_pct(nest['val_acc']) if nest.get('val_acc') is not None else '-'})"
             + (f", baseline {base.get('selected_epoch')} (val {_pct(base['val_acc'])})" if base and base.get('val_acc') is not None else "")
             + f". Training wall time on the machine that ran this evaluation ({os.cpu_count()} CPU cores; "
             "by default `all` and `train` run the two models concurrently, one process and one "
             "intra-op thread each): nested "
             f"{nest.get('train_seconds')} s" + (f", baseline {base.get('train_seconds')} s" if base else "") + ".\n")

    L.append("## Cutout: tasks that need only part of the tree\n")
    L.append("Accuracy on the test images of the task's categories, predicting among those categories only "
             "(softmax/argmax over their logits), computed with onnxruntime running only the needed segments. "
             "Excluded = share of the all-active cost that is not run.\n")
    L.append("| task | kind | categories | segments run | test images | accuracy | active cloud params | "
             "cloud params excluded | active cloud MACs | cloud MACs excluded | active total params | "
             "total params excluded | active total MACs | total MACs excluded |")
    L.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in r["tasks"]:
        L.append(f"| {t['name']} | {t['kind']} | {', '.join(t['category_names'])} | {', '.join(t['segments'])} | "
                 f"{t['n_images']} | {_pct(t['accuracy'])} | {_fmt_int(t['cloud_params'])} | "
                 f"{t['cloud_params_excluded_pct']:.1f} % | {_fmt_int(t['cloud_macs'])} | "
                 f"{t['cloud_macs_excluded_pct']:.1f} % | {_fmt_int(t['total_params'])} | "
                 f"{t['total_params_excluded_pct']:.1f} % | {_fmt_int(t['total_macs'])} | "
                 f"{t['total_macs_excluded_pct']:.1f} % |")
    L.append("")
    singles = [t for t in r["tasks"] if t["kind"].startswith("top-level")]
    if singles:
        lo = min(t["cloud_params_excluded_pct"] for t in singles)
        hi = max(t["cloud_params_excluded_pct"] for t in singles)
        lo_m = min(t["cloud_macs_excluded_pct"] for t in singles)
        hi_m = max(t["cloud_macs_excluded_pct"] for t in singles)
        best = max(r["tasks"], key=lambda t: t["cloud_params_excluded_pct"])
        L.append(f"A single top-level-group task excludes {lo:.1f}-{hi:.1f} % of the cloud parameters and "
                 f"{lo_m:.1f}-{hi_m:.1f} % of the cloud MACs; the best case here ({best['name']}) excludes "
                 f"{best['cloud_params_excluded_pct']:.1f} % of cloud params / {best['cloud_macs_excluded_pct']:.1f} % "
                 f"of cloud MACs ({best['total_params_excluded_pct']:.1f} % / {best['total_macs_excluded_pct']:.1f} % "
                 f"of the whole model, backbone included). The paper's best case is "
                 f"{PAPER_BEST['params_excluded']} % of parameters and {PAPER_BEST['gmacs_excluded']} % of GMACs "
                 f"excluded (ImageNet-scale model, different architecture; not directly comparable). "
                 f"Our backbone runs on the edge for every task, so whole-model exclusion is lower.\n")

    L.append("## Top-down attention (gains)\n")
    L.append("Accuracy over all categories on the test set, with per-image gains on the top-level segments "
             "(computed with onnxruntime on the package). 'Enhance' multiplies the true top-level group by "
             "the gain; 'inhibit' multiplies every wrong top-level group by the gain; 'noisy' enhances with "
             "gain 2 a group that is right with the stated probability, else a uniformly random wrong one.\n")
    L.append("| signal | gain | signal correct | accuracy | vs no signal |")
    L.append("|---|---:|---:|---:|---:|")
    base_acc = r["attention"][0]["accuracy"]
    for a in r["attention"]:
        sc = a.get("signal_correct_fraction", 1.0 if a["signal"] != "none" else None)
        L.append(f"| {a['signal']} | {a['gain']} | {'-' if sc is None else _pct(sc)} | {_pct(a['accuracy'])} | "
                 f"{100 * (a['accuracy'] - base_acc):+.2f} pt |")
    L.append("")
    L.append("A correct signal can only help here: a gain g adds log g to the logits of the enhanced group "
             "and the ranking inside a group is unchanged, so it only fixes errors that cross top-level "
             "groups (a minority, see the confusion matrix). A wrong signal pushes images into the named "
             "group, so noisy signals can cost accuracy.\n")

    b = r["bottleneck"]
    L.append("## Bottleneck (what the edge sends)\n")
    L.append(f"| representation | bytes per image |")
    L.append("|---|---:|")
    L.append(f"| raw image (uint8) | {b['raw_image_bytes']} |")
    L.append(f"| PNG of the image (zlib level 9, mean over test) | {b['png_mean_bytes']:.1f} (median {b['png_median_bytes']:.0f}) |")
    L.append(f"| bottleneck {b['shape']} fp32 | {b['bytes_fp32']} |")
    L.append(f"| bottleneck int8 (affine over tanh range [-1, 1], 256 levels) | {b['bytes_int8']} |")
    L.append("")
    L.append(f"Test accuracy with the bottleneck quantised to int8: {_pct(b['int8_accuracy'])} "
             f"(fp32: {_pct(b['fp32_accuracy'])}, difference {100 * (b['int8_accuracy'] - b['fp32_accuracy']):+.2f} pt).\n")

    L.append("## Reproduce\n")
    L.append("```\nPYTHONPATH=python .venv/bin/python -m spotlight_model all --out models/" + m["name"] + "\n```\n"
             "(from the repository root; see python/README.md). "
             f"ONNX composed (backbone + segments) vs full.onnx max abs logit difference on the test set: "
             f"{nest['composed_vs_full_max_abs_diff']:.2e}.\n")
    return "\n".join(L)
