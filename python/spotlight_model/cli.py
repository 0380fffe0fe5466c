"""Command line: python -m spotlight_model {train,export,evaluate,all,remanifest,attention,ledger}."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import ENV_DIR, channel_stats, load_dataset, split_train_val, to_nchw_float
from .model import BASELINE_CHANNELS, Baseline, NestedNet, baseline_costs, count_params
from .train import DISTILL_TEMPERATURE as DEFAULT_DISTILL_TEMPERATURE, accuracy, fit, seed_all
from .tree import load_tree, parse_tree

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TREE = "python/trees/fashion_mnist.json"
DEFAULT_WORK = "build/model-work"
DEFAULT_OUT = "models/fashion-mnist-nested"
DEFAULT_TEST_READS = "python/test_reads.json"
DEFAULT_EPOCHS = 25


def log(msg: str) -> None:
    print(msg, flush=True)


def _rel(p: str | None, default: str | None = None) -> Path | None:
    """User-given paths are relative to the current directory; the defaults are relative to
    the repository root (so they work from the repo root and from python/ alike)."""
    if p is not None:
        return Path(p)
    return None if default is None else REPO / default


# ---------------------------------------------------------------- train


def build_nested(tree, cfg: dict, in_channels: int) -> NestedNet:
    return NestedNet(tree, in_channels=in_channels, bottleneck=cfg["bottleneck"],
                     backbone_widths=tuple(cfg["backbone_widths"]),
                     backbone_low_widths=tuple(cfg.get("backbone_low_widths", ())))


def build_baseline(num_classes: int, cfg: dict, in_channels: int) -> Baseline:
    return Baseline(num_classes, in_channels=in_channels, bottleneck=cfg["bottleneck"],
                    channels=tuple(cfg["baseline_channels"]),
                    backbone_widths=tuple(cfg["backbone_widths"]),
                    backbone_low_widths=tuple(cfg.get("backbone_low_widths", ())))


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    tree_path = _rel(args.tree, DEFAULT_TREE)
    tree = load_tree(tree_path)
    ds = load_dataset(args.data)
    n_cls = len(tree.categories)
    if int(ds.train_labels.max()) >= n_cls:
        raise SystemExit(f"labels go up to {ds.train_labels.max()} but the tree has {n_cls} categories")
    tr_idx, va_idx = split_train_val(len(ds.train_labels), args.val_size, args.seed)
    if args.limit:
        tr_idx = tr_idx[:args.limit]
        va_idx = va_idx[:max(1, min(len(va_idx), args.limit // 4))]
    mean, std = channel_stats(ds.train_images[tr_idx])
    x_tr = torch.from_numpy(to_nchw_float(ds.train_images[tr_idx]))
    y_tr = torch.from_numpy(ds.train_labels[tr_idx])
    x_va = torch.from_numpy(to_nchw_float(ds.train_images[va_idx]))
    y_va = torch.from_numpy(ds.train_labels[va_idx])
    in_ch = ds.image_shape[0]
    widths = (args.backbone_widths.split(",") if args.backbone_widths
              else tree.source.get("backbone_widths", [32, 64, 64]))
    low = (args.backbone_low_widths.split(",") if args.backbone_low_widths is not None
           else tree.source.get("backbone_low_widths", []))
    cfg = {"bottleneck": args.bottleneck, "backbone_widths": [int(w) for w in widths],
           "backbone_low_widths": [int(w) for w in low if str(w).strip()],
           "baseline_channels": [int(c) for c in args.baseline_channels.split(",")]}
    hp = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
          "weight_decay": args.weight_decay, "label_smoothing": 0.05, "seed": args.seed}
    work = _rel(args.work, DEFAULT_WORK)
    work.mkdir(parents=True, exist_ok=True)
    log(f"data: {ds.source}  train {len(tr_idx)}  val {len(va_idx)}  test {len(ds.test_labels)} "
        f"(test is not touched by train)  mean {mean} std {std}")
    which = [w.strip() for w in args.models.split(",") if w.strip()]
    distill = args.distill
    # refused before anything trains: with --distill the baseline trains first, for an hour
    if not 0.0 <= distill <= 1.0:
        raise SystemExit(f"--distill {distill}: the teacher's share of the loss must be in [0, 1]")
    if distill > 0 and not args.distill_temperature > 0:
        raise SystemExit(f"--distill-temperature {args.distill_temperature}: must be > 0")
    if distill > 0 and "nested" in which:
        # the nested model learns from the baseline's logits: the baseline trains first (or is
        # read from <work>/baseline.pt), so the two cannot train side by side
        which = sorted(which, key=lambda k: k != "baseline")
        if "baseline" not in which and not (work / "baseline.pt").is_file():
            raise SystemExit(f"--distill {distill}: the teacher is the baseline, but {work / 'baseline.pt'} "
                             "does not exist; train it first (--models baseline) or add it to --models")
    if len(which) > 1 and args.parallel and args.threads >= len(which) and not distill > 0:
        # One process per model, threads split between them: on 2 shared cores this is much
        # faster than 2 intra-op threads on one model (no straggler waits at every op).
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        procs = []
        for kind in which:
            sub = argparse.Namespace(**vars(args))
            sub.models, sub.threads, sub.parallel = kind, args.threads // len(which), False
            pr = ctx.Process(target=cmd_train, args=(sub,), name=f"train-{kind}")
            pr.start()
            procs.append(pr)
        for pr in procs:
            pr.join()
        bad = [pr.name for pr in procs if pr.exitcode != 0]
        if bad:
            raise SystemExit(f"training failed: {bad}")
        return
    for kind in which:
        seed_all(args.seed)
        model = build_nested(tree, cfg, in_ch) if kind == "nested" else build_baseline(n_cls, cfg, in_ch)
        log(f"{kind}: {count_params(model)} params")
        hp_kind, teach = dict(hp), {}
        if kind == "nested" and distill > 0:
            teacher, tck = load_checkpoint(work, "baseline")
            same = (tck["mean"] == mean and tck["std"] == std and tck["train_size"] == len(tr_idx)
                    and tck["hparams"]["seed"] == args.seed)
            if not same:
                raise SystemExit(f"--distill: {work / 'baseline.pt'} was trained on another split or "
                                 "normalisation (seed, --limit or --val-size differ); retrain it with these flags")
            hp_kind.update(distill=distill, distill_temperature=args.distill_temperature,
                           teacher=f"baseline (val_acc {tck['val_acc']:.4f})")
            teach = {"teacher": teacher, "distill": distill,
                     "distill_temperature": args.distill_temperature}
            log(f"nested: distilling from the baseline (share {distill}, temperature "
                f"{args.distill_temperature}, teacher val_acc {tck['val_acc']:.4f})")
        t0 = time.time()
        state, hist = fit(model, x_tr, y_tr, x_va, y_va, mean=mean, std=std, desc=kind, log=log,
                          **hp, **teach)
        secs = time.time() - t0
        best = max(hist, key=lambda r: (r.get("val_acc", r["train_acc"]), r["epoch"]))
        log(f"{kind}: trained in {secs:.0f} s; selected epoch {best['epoch']} "
            f"(val_acc {best.get('val_acc', float('nan')):.4f})")
        ckpt = {"kind": kind, "state_dict": state, "config": cfg, "hparams": hp_kind, "history": hist,
                "train_seconds": round(secs, 1), "mean": mean, "std": std,
                "image_shape": list(ds.image_shape), "tree": tree.source,
                "tree_file": _display_path(tree_path), "dataset": ds.source,
                "train_size": int(len(tr_idx)), "val_size": int(len(va_idx)),
                "val_acc": best.get("val_acc"), "selected_epoch": best["epoch"],
                "created_by": f"spotlight_model {__version__}", "torch": torch.__version__}
        torch.save(ckpt, work / f"{kind}.pt")
        log(f"{kind}: checkpoint -> {work / (kind + '.pt')}")


def _display_path(p: Path) -> str:
    try:
        return p.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return p.name


def load_checkpoint(work: Path, kind: str):
    ckpt = torch.load(work / f"{kind}.pt", map_location="cpu", weights_only=False)
    in_ch = ckpt["image_shape"][0]
    if kind == "nested":
        tree = parse_tree(ckpt["tree"])
        model = build_nested(tree, ckpt["config"], in_ch)
    else:
        model = build_baseline(len(ckpt["tree"]["categories"]), ckpt["config"], in_ch)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# ---------------------------------------------------------------- export


def cmd_export(args) -> None:
    from .package import check_package, export_package
    torch.set_num_threads(args.threads)
    work, out = _rel(args.work, DEFAULT_WORK), _rel(args.out, DEFAULT_OUT)
    model, ckpt = load_checkpoint(work, "nested")
    name = args.name or ckpt["tree"].get("name") or out.name
    training = {
        "dataset": Path(ckpt["dataset"]).name,
        "tree_file": ckpt["tree_file"],
        "train_size": ckpt["train_size"],
        "val_size": ckpt["val_size"],
        "selected_epoch": ckpt["selected_epoch"],
        "val_acc": ckpt["val_acc"],
        "train_seconds": ckpt["train_seconds"],
        "torch": ckpt["torch"],
        **ckpt["hparams"],
        "optimizer": "AdamW + OneCycleLR", "augmentation": "pad 2 + random crop, horizontal flip",
    }
    manifest = export_package(model, out, name=name, mean=ckpt["mean"], std=ckpt["std"],
                              image_shape=tuple(ckpt["image_shape"]), training=training)
    check_package(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"exported {out} ({size / 1e6:.2f} MB) {manifest['content_hash']}")


def cmd_remanifest(args) -> None:
    from .package import remanifest
    remanifest(_rel(args.out, DEFAULT_OUT), log=log)


# ---------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate
    torch.set_num_threads(args.threads)
    evaluate(pkg_dir=_rel(args.out, DEFAULT_OUT), work=_rel(args.work, DEFAULT_WORK), data=args.data, threads=args.threads,
             results_path=_rel(args.results), log=log, test_reads=_rel(args.test_reads, DEFAULT_TEST_READS))


def cmd_ledger(args) -> None:
    """Rewrite the card's test-set section from the ledger (after an entry was added by hand):
    reads neither the test split nor the checkpoints."""
    from .evaluate import read_test_reads, splice_test_reads
    from .package import check_package
    pkg = _rel(args.out, DEFAULT_OUT)
    manifest = check_package(pkg)
    ledger = _rel(args.test_reads, DEFAULT_TEST_READS)
    entries = read_test_reads(ledger, manifest["name"])
    if entries is None:
        raise SystemExit(f"ledger {ledger} does not exist")
    card = pkg / "model_card.md"
    card.write_text(splice_test_reads(card.read_text(encoding="utf-8"), entries, manifest["name"]),
                    encoding="utf-8")
    log(f"{card}: test-set section rewritten from {len(entries)} ledger entries for {manifest['name']}")


def cmd_attention(args) -> None:
    """Attention with its controls on the test split, written into the existing model card
    (its attention and test-set sections only): needs the package, not the training checkpoints."""
    from .attention import measure
    from .evaluate import baseline_test_logits, read_test_reads, splice_card
    from .package import PackageRunner, check_package
    torch.set_num_threads(args.threads)
    pkg, work = _rel(args.out, DEFAULT_OUT), _rel(args.work, DEFAULT_WORK)
    manifest = check_package(pkg)
    runner = PackageRunner(pkg, threads=args.threads)
    ds = load_dataset(args.data)
    x = runner.preprocess(ds.test_images)
    feats = np.concatenate([runner.run_backbone(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    bl, _ = baseline_test_logits(work, ds.test_images)
    log(f"test split {len(x)} images; baseline checkpoint {'used' if bl is not None else 'not found in ' + str(work)}")

    def row(r):
        log(f"  {r['mode']:<7} {r['signal']:<29} gain {r['gain']:<5} signal right {100 * r['signal_correct']:6.2f} %  "
            f"nested {100 * r['nested']:6.2f} %  prior on gain-1 logits {100 * r['nested_prior']:6.2f} %  "
            f"differing {r['prediction_disagreements']}  max logit diff {r['max_abs_logit_diff']:.1e}")

    a = measure(runner, feats, ds.test_labels, baseline_logits=bl, on_row=row)
    r = {"package": manifest["name"], "content_hash": manifest["content_hash"], "test_images": int(len(x)),
         "attention": a, "test_reads": read_test_reads(_rel(args.test_reads, DEFAULT_TEST_READS), manifest["name"])}
    results = _rel(args.results) or work / "attention.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    card = pkg / "model_card.md"
    card.write_text(splice_card(card.read_text(encoding="utf-8"), r, manifest), encoding="utf-8")
    log(f"no signal: nested {100 * a['none']['nested']:.2f} %; results -> {results}; card -> {card}")


def cmd_all(args) -> None:
    t0 = time.time()
    cmd_train(args)
    cmd_export(args)
    cmd_evaluate(args)
    log(f"all done in {time.time() - t0:.0f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m spotlight_model",
                                description="Train / export / evaluate the nested-feature model.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--data", default=None,
                        help=f"idx directory or .npz (default: ${ENV_DIR} or /usr/share/datasets/fashion-mnist)")
        sp.add_argument("--work", default=None, help=f"checkpoint dir (default <repo>/{DEFAULT_WORK})")
        sp.add_argument("--out", default=None, help=f"package dir (default <repo>/{DEFAULT_OUT})")
        sp.add_argument("--threads", type=int, default=2)

    def train_opts(sp):
        sp.add_argument("--tree", default=None, help=f"category tree JSON (default <repo>/{DEFAULT_TREE})")
        sp.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
        sp.add_argument("--batch-size", type=int, default=128)
        sp.add_argument("--lr", type=float, default=3e-3)
        sp.add_argument("--weight-decay", type=float, default=5e-4)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--val-size", type=int, default=5000)
        sp.add_argument("--limit", type=int, default=0, help="train on the first N training images only (smoke)")
        sp.add_argument("--bottleneck", type=int, default=8)
        sp.add_argument("--backbone-widths", default=None,
                        help="backbone convolutions, e.g. 16,48 (default: the tree file's "
                             "backbone_widths, else 32,64,64)")
        sp.add_argument("--backbone-low-widths", default=None,
                        help="backbone convolutions at the bottleneck's resolution, after the "
                             "second pool, e.g. 64 (default: the tree file's backbone_low_widths, "
                             "else none)")
        sp.add_argument("--baseline-channels", default=",".join(map(str, BASELINE_CHANNELS)))
        sp.add_argument("--models", default="nested,baseline", help="which models to train")
        sp.add_argument("--distill", type=float, default=0.0,
                        help="share of the nested model's loss taken from the baseline's logits "
                             "(knowledge distillation, 0-1; default 0 = off). The baseline then "
                             "trains first and the nested model after it")
        sp.add_argument("--distill-temperature", type=float, default=DEFAULT_DISTILL_TEMPERATURE,
                        help="softmax temperature of the distillation term")
        sp.add_argument("--no-parallel", dest="parallel", action="store_false",
                        help="train the models one after the other (default: in parallel processes)")

    def export_opts(sp):
        sp.add_argument("--name", default=None, help="package name (default: from the tree file)")

    def eval_opts(sp, default_results="<work>/results.json"):
        sp.add_argument("--results", default=None, help=f"results JSON (default {default_results})")
        sp.add_argument("--test-reads", default=None,
                        help=f"ledger of test-split reads listed in the card (default <repo>/{DEFAULT_TEST_READS})")

    sp = sub.add_parser("train", help="train the nested model and the baseline")
    common(sp); train_opts(sp); sp.set_defaults(fn=cmd_train)
    sp = sub.add_parser("export", help="export the nested checkpoint as a model package")
    common(sp); export_opts(sp); sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("evaluate", help="evaluate on the test set, write model_card.md + results JSON")
    common(sp); eval_opts(sp); sp.set_defaults(fn=cmd_evaluate)
    sp = sub.add_parser("attention", help="measure attention with its controls on the test split and "
                        "rewrite the card's attention and test-set sections (no checkpoints needed)")
    common(sp); eval_opts(sp, "<work>/attention.json"); sp.set_defaults(fn=cmd_attention)
    sp = sub.add_parser("remanifest", help="rewrite manifest.json of an existing package (upgrading a "
                        "spotlight.model/v1 one), keeping its ONNX files byte for byte")
    sp.add_argument("--out", default=None, help=f"package dir (default <repo>/{DEFAULT_OUT})")
    sp.set_defaults(fn=cmd_remanifest)
    sp = sub.add_parser("ledger", help="rewrite the card's test-set section from python/test_reads.json "
                        "(after adding an entry by hand; the test split is not read)")
    sp.add_argument("--out", default=None, help=f"package dir (default <repo>/{DEFAULT_OUT})")
    sp.add_argument("--test-reads", default=None, help=f"the ledger (default <repo>/{DEFAULT_TEST_READS})")
    sp.set_defaults(fn=cmd_ledger)
    sp = sub.add_parser("all", help="train + export + evaluate")
    common(sp); train_opts(sp); export_opts(sp); eval_opts(sp); sp.set_defaults(fn=cmd_all)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
