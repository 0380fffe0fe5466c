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

from . import attention as attn
from .data import load_dataset, to_nchw_float
from .package import PackageRunner, check_package
from .tree import parse_tree

PAPER_BEST = {"params_excluded": 73.48, "gmacs_excluded": 84.41}


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


def baseline_test_logits(work: Path, test_images: np.ndarray):
    """(logits, checkpoint) of the baseline checkpoint in work/ on the test images, or (None, None)."""
    if not (work / "baseline.pt").exists():
        return None, None
    from .cli import load_checkpoint
    from .train import predict_logits
    bmodel, bck = load_checkpoint(work, "baseline")
    bl = predict_logits(bmodel, torch.from_numpy(to_nchw_float(test_images)), bck["mean"], bck["std"])
    return bl.numpy(), (bmodel, bck)


def read_test_reads(path: Path | None, name: str) -> list[dict] | None:
    """The entries for package `name` of the test-split ledger (python/test_reads.json)."""
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8")).get("packages", {}).get(name, [])


def evaluate(pkg_dir: Path, work: Path, data: str | None, threads: int = 2,
             results_path: Path | None = None, tree_path: Path | None = None, batch: int = 1000,
             log=print, test_reads: Path | None = None) -> dict:
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

    n_rows = len(attn.RELIABILITIES) * (len(attn.ENHANCE_GAINS) + len(attn.INHIBIT_GAINS))
    n_steps = 2 * ((n + batch - 1) // batch) + 1 + 20 + 1 + n_rows + 1
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

    # ---- baseline logits (for its accuracy and the attention controls)
    bl, bl_ck = baseline_test_logits(work, ds.test_images)
    bar.update()

    # ---- top-down attention, with its controls
    attention = attn.measure(runner, feats, y, baseline_logits=bl, on_row=lambda _: bar.update())

    # ---- bottleneck size + int8
    fshape = manifest["backbone"]["output_shape"][1:]
    nvals = int(np.prod(fshape))
    pngs = np.array([png_size(im) for im in ds.test_images])
    cq = seg_logits(quantize_int8(feats))
    int8_acc = _acc(np.stack([cq[ci] for ci in range(k)], axis=1).argmax(1), y)
    bar.update()

    # ---- baseline
    baseline = None
    if bl is not None:
        from .model import baseline_costs
        bmodel, bck = bl_ck
        bpred = bl.argmax(1)
        bconf = np.zeros((k, k), np.int64)
        np.add.at(bconf, (y, bpred), 1)
        baseline = {"accuracy": _acc(bpred, y), "costs": baseline_costs(bmodel, tuple(bck["image_shape"])),
                    "val_acc": bck.get("val_acc"), "selected_epoch": bck.get("selected_epoch"),
                    "train_seconds": bck.get("train_seconds"), "epochs": bck["hparams"]["epochs"],
                    "history": bck.get("history"), "confusion": bconf.tolist()}
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
        "test_reads": read_test_reads(test_reads, manifest["name"]),
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


def render_attention_and_test_reads(r: dict, m: dict) -> list[str]:
    """The card sections that `python -m spotlight_model attention` can also rewrite alone."""
    return attn.render(r["attention"], r["test_images"]) + render_test_reads(r.get("test_reads"), m["name"])


def splice_card(card: str, r: dict, m: dict) -> str:
    """The card with its attention and test-set sections replaced by those of r (the rest kept)."""
    out = _replace_sections(card, ("## Top-down attention", "## Test-set discipline"),
                            render_attention_and_test_reads(r, m))
    return out.replace(", which is used only here. ",
                       ", which only `evaluate` reads (how often, and for which recipes: "
                       "*Test-set discipline* below). ")


def splice_test_reads(card: str, entries: list[dict] | None, name: str) -> str:
    """The card with only its test-set section replaced by one rendered from `entries` (the
    ledger's entries for package `name`): what a new ledger entry changes, without reading the
    test split again."""
    return _replace_sections(card, ("## Test-set discipline",), render_test_reads(entries, name))


def _replace_sections(card: str, own: tuple[str, ...], new: list[str]) -> str:
    """`card` with the run of `## ` sections whose headings start with one of `own` (from the
    first of them to the next other `## ` heading) replaced by the lines `new`."""
    lines = card.split("\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(own)), None)
    if start is None:
        raise ValueError(f"the model card has no '{own[0]}' section to replace")
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("## ") and not lines[i].startswith(own)), len(lines))
    return "\n".join(lines[:start] + "\n".join(new).split("\n") + lines[end:])


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def render_test_reads(entries: list[dict] | None, name: str) -> list[str]:
    L = ["## Test-set discipline\n"]
    if entries is None:
        L.append("No test-split ledger was given to this evaluation (`python/test_reads.json`).\n")
        return L
    recipes = [e for e in entries if e.get("kind") == "recipe"]
    reseeds = [e for e in entries if e.get("kind") == "reseed"]
    evals = [e for e in entries if e.get("kind") == "evaluation"]
    L.append(f"Every time the test split was read for `{name}`, as the ledger `python/test_reads.json` "
             f"records it: **{len(recipes)} training recipes** were evaluated on it"
             + (f", plus {_n(len(reseeds), 'retrain')} of a recipe with another seed" if reseeds else "")
             + (f" and {_n(len(evals), 'evaluation')} of an already shipped model (no training, nothing "
                "selected)" if evals else "") + ".\n")
    L.append("| # | what | commit | nested test | baseline test | shipped |")
    L.append("|---:|---|---|---:|---:|---|")
    for i, e in enumerate(entries, 1):
        L.append(f"| {i} | {e['what']} | {e.get('commit', '-')} | {_pct(e['nested']) if e.get('nested') is not None else '-'} | "
                 f"{_pct(e['baseline']) if e.get('baseline') is not None else '-'} | {e.get('shipped', '-')} |")
    L.append("")
    notes = [e["note"] for e in entries if e.get("note")]
    if notes:
        L.append("\n\n".join(notes) + "\n")
    return L


def reproduce_args(m: dict) -> str:
    """The `all` arguments that retrain this package: its tree file, epochs and distillation
    where they are not the CLI's defaults (v1's tree and epochs, no distillation), a work
    directory of its own for any package but the default one, then the output directory."""
    from .cli import DEFAULT_DISTILL_TEMPERATURE, DEFAULT_EPOCHS, DEFAULT_OUT, DEFAULT_TREE
    t = m.get("training", {})
    args = []
    tree = t.get("tree_file")
    if tree and tree != DEFAULT_TREE:
        args.append(f"--tree {tree}")
    if t.get("epochs", DEFAULT_EPOCHS) != DEFAULT_EPOCHS:
        args.append(f"--epochs {t['epochs']}")
    if t.get("distill", 0) > 0:
        args.append(f"--distill {t['distill']}")
        if t.get("distill_temperature", DEFAULT_DISTILL_TEMPERATURE) != DEFAULT_DISTILL_TEMPERATURE:
            args.append(f"--distill-temperature {t['distill_temperature']}")
    if m["name"] != Path(DEFAULT_OUT).name:
        # Another package's checkpoints go beside, not over, the default package's.
        args.append(f"--work build/model-work-{m['name']}")
    return " ".join(args + [f"--out models/{m['name']}"])


def _pct(v) -> str:
    return f"{100 * v:.2f} %"


def summary(r: dict) -> str:
    lines = [f"nested test accuracy {_pct(r['nested']['accuracy'])}"]
    if r["baseline"]:
        lines.append(f"baseline test accuracy {_pct(r['baseline']['accuracy'])}")
    for t in r["tasks"]:
        lines.append(f"  task {t['name']:<32} acc {_pct(t['accuracy']):>9}  cloud params excl "
                     f"{t['cloud_params_excluded_pct']:5.1f} %  cloud MACs excl {t['cloud_macs_excluded_pct']:5.1f} %")
    for a in r["attention"]["rows"]:
        lines.append(f"  attention {a['mode']:<7} {a['signal']:<29} gain {a['gain']:<5} acc {_pct(a['nested'])}"
                     f"  prior on gain-1 logits {_pct(a['nested_prior'])}"
                     + (f"  baseline + prior {_pct(a['baseline_prior'])}" if a["baseline_prior"] is not None else ""))
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
             f"{r['dataset']} **test split** ({r['test_images']} images), which only `evaluate` reads "
             f"(how often, and for which recipes: *Test-set discipline* below). "
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
    distill = tr.get("distill") or 0
    L.append(f"Training ({'the same recipe for both models, except the distillation below' if distill > 0 else 'both models identical recipe'}): "
             f"{nest.get('epochs')} epochs, AdamW + one-cycle LR "
             f"(max lr {tr.get('lr')}, weight decay {tr.get('weight_decay')}), batch {tr.get('batch_size')}, "
             f"label smoothing {tr.get('label_smoothing')}, random shift (pad 2 + crop) and horizontal flip, "
             f"seed {tr.get('seed')}; {tr.get('train_size')} training / {tr.get('val_size')} validation images. "
             f"Selected epoch (by validation accuracy): nested {nest.get('selected_epoch')} "
             f"(val {_pct(nest['val_acc']) if nest.get('val_acc') is not None else '-'})"
             + (f", baseline {base.get('selected_epoch')} (val {_pct(base['val_acc'])})" if base and base.get('val_acc') is not None else "")
             + (f". The nested model also learned from the baseline's logits (knowledge distillation, "
                f"`--distill {distill}`): loss = (1 - {distill}) * cross-entropy + {distill} * T^2 * "
                f"KL(baseline || nested) at temperature T = {tr.get('distill_temperature')}; teacher: "
                f"{tr.get('teacher', 'the baseline')}, trained before it" if distill > 0 else "")
             + f". Training wall time on the machine that ran this evaluation ({os.cpu_count()} CPU cores; "
             + ("with distillation the baseline trains first and the nested model after it"
                if distill > 0 else
                "by default `all` and `train` run the two models concurrently, one process and one "
                "intra-op thread each")
             + f"): nested {nest.get('train_seconds')} s" + (f", baseline {base.get('train_seconds')} s" if base else "") + ".\n")

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

    L.extend(render_attention_and_test_reads(r, m))

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
    L.append("```\nPYTHONPATH=python .venv/bin/python -m spotlight_model all " + reproduce_args(m) + "\n```\n"
             "(from the repository root; see python/README.md). "
             f"ONNX composed (backbone + segments) vs full.onnx max abs logit difference on the test set: "
             f"{nest['composed_vs_full_max_abs_diff']:.2e}.\n")
    return "\n".join(L)
