import json

import numpy as np
import pytest
import torch

from conftest import REPO
from spotlight_model.cli import load_checkpoint
from spotlight_model.data import read_idx
from spotlight_model.integrity import MACS_RTOL, canonical_json, check_costs, content_hash, write_manifest
from spotlight_model.package import PackageRunner, UnsupportedSchema, check_package, remanifest
from spotlight_model.tree import parse_tree

SHIPPED = REPO / "models" / "fashion-mnist-nested"
SHIPPED_V2 = REPO / "models" / "fashion-mnist-nested-v2"


def _inputs(runner, small_npz, n=64):
    z = np.load(small_npz)
    x = runner.preprocess(z["test_images"][:n])
    rng = np.random.default_rng(0)
    gains = rng.uniform(0.0, 3.0, size=(n, len(runner.manifest["segments"]))).astype(np.float32)
    return x, gains


def test_cli_outputs(trained):
    pkg = trained["pkg"]
    for rel in ("manifest.json", "backbone.onnx", "full.onnx", "model_card.md"):
        assert (pkg / rel).is_file(), rel
    r = json.loads(trained["results"].read_text())
    assert 0.0 <= r["nested"]["accuracy"] <= 1.0
    assert r["baseline"] is not None
    assert r["bottleneck"]["bytes_int8"] == 8 * 7 * 7
    size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    assert size < 10e6


def test_onnx_matches_torch(trained):
    model, _ = load_checkpoint(trained["work"], "nested")
    runner = PackageRunner(trained["pkg"])
    x, gains = _inputs(runner, trained["data"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(gains)).numpy()
        ref_feats = model.backbone(torch.from_numpy(x)).numpy()
    full = runner.run_full(x, gains)
    assert full.shape == (len(x), len(runner.manifest["categories"]))
    # logits are O(10) (scale * cosine + log r): 1e-5 absolute is ~1e-6 relative, float32 round-off
    assert np.abs(full - ref).max() <= 1e-5
    assert np.abs(runner.run_backbone(x) - ref_feats).max() <= 1e-5
    # dynamic batch axis: batch of 1 and of 3 work too
    for n in (1, 3):
        assert np.abs(runner.run_full(x[:n], gains[:n]) - ref[:n]).max() <= 1e-5


def test_composed_equals_full(trained):
    runner = PackageRunner(trained["pkg"])
    x, gains = _inputs(runner, trained["data"])
    assert np.abs(runner.composed_logits(x, gains) - runner.run_full(x, gains)).max() <= 1e-5


def test_manifest_schema_and_hash(trained):
    pkg = trained["pkg"]
    m = check_package(pkg)
    assert m["schema"] == "spotlight.model/v2"
    assert m["content_hash"] == content_hash(m)
    assert sorted(m["files"]) == sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.onnx"))
    assert m["gain"] == {"multiplies": "segment_output", "zero_is_cutout": True, "logit_effect": "adds_log_gain"}
    assert m["backbone"]["output_range"] == [-1.0, 1.0]
    # every listed file exists; manifest order has parents before children
    ids = [s["id"] for s in m["segments"]]
    for j, s in enumerate(m["segments"]):
        assert s["parent"] is None or ids.index(s["parent"]) < j
    # tampering with an ONNX file is reported naming the file
    rel = m["segments"][0]["file"]
    f = pkg / rel
    data = f.read_bytes()
    try:
        f.write_bytes(data + b"\0")
        with pytest.raises(ValueError, match=f"{rel} hashes to sha256:[0-9a-f]{{64}}, manifest.json lists"):
            check_package(pkg)
    finally:
        f.write_bytes(data)
    check_package(pkg)


def _copy_package(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model_card.md"))
    return json.loads((dst / "manifest.json").read_text(encoding="utf-8"))


def test_category_order_is_part_of_the_identity(tmp_path):
    m = _copy_package(SHIPPED, tmp_path / "pkg")
    m["categories"][5], m["categories"][7] = m["categories"][7], m["categories"][5]
    write_manifest(m, tmp_path / "pkg")
    with pytest.raises(ValueError, match="does not match the manifest's content"):
        check_package(tmp_path / "pkg")
    rehashed = dict(m, content_hash=content_hash(m))
    assert rehashed["content_hash"] != json.loads((SHIPPED / "manifest.json").read_text())["content_hash"]
    write_manifest(rehashed, tmp_path / "pkg")
    check_package(tmp_path / "pkg")


def test_unknown_schema_is_refused_naming_the_accepted_ones(tmp_path):
    m = _copy_package(SHIPPED, tmp_path / "pkg")
    for schema in ("spotlight.model/v1", "spotlight.model/v3", None):
        m["schema"] = schema
        write_manifest(m, tmp_path / "pkg")
        with pytest.raises(UnsupportedSchema) as e:
            check_package(tmp_path / "pkg")
        assert (f"manifest schema {json.dumps(schema)} is not supported; this reader accepts spotlight.model/v2; "
                "re-export the package") in str(e.value)
        assert "remanifest --out <package dir>" in str(e.value)


def test_remanifest_upgrades_v1_keeping_the_onnx_files(tmp_path):
    """The shipped manifest is exactly what remanifest makes of its v1 predecessor."""
    shipped = _copy_package(SHIPPED, tmp_path / "pkg")
    v1 = {k: v for k, v in shipped.items() if k not in ("files", "gain")}
    v1["schema"] = "spotlight.model/v1"
    v1["backbone"] = {k: v for k, v in shipped["backbone"].items() if k != "output_range"}
    write_manifest(v1, tmp_path / "pkg")
    onnx_before = {p.name: p.read_bytes() for p in (tmp_path / "pkg").rglob("*.onnx")}
    m = remanifest(tmp_path / "pkg", log=lambda *_: None)
    assert m == shipped
    assert (tmp_path / "pkg" / "manifest.json").read_text() == (SHIPPED / "manifest.json").read_text()
    assert {p.name: p.read_bytes() for p in (tmp_path / "pkg").rglob("*.onnx")} == onnx_before


def test_canonical_json_vectors():
    """The vectors the Rust reader checks too (crates/spotlight-model/tests/package.rs)."""
    doc = json.loads((REPO / "crates/spotlight-model/tests/data/canonical.json").read_text(encoding="utf-8"))
    for case in doc["cases"]:
        assert canonical_json(case["value"]) == case["canonical"], case["what"]
        if case["content_hash"] is not None:
            assert content_hash(case["value"]) == case["content_hash"], case["what"]
    with pytest.raises(ValueError):
        canonical_json(float("nan"))
    with pytest.raises(ValueError):
        canonical_json(2 ** 64)


@pytest.mark.parametrize("which", ["smoke", "shipped", "shipped-v2"])
def test_manifest_costs_match_the_onnx_graphs(trained, which):
    """check_costs allows graph params in [manifest - conv-bias elements, manifest] (BatchNorm
    folding) and MACs within MACS_RTOL (0.1 %); in fact MACs agree exactly and params differ by
    exactly the folding: a conv bias per BatchNorm channel in the graph for a scale and a shift
    per channel in PyTorch."""
    pkg = {"smoke": trained["pkg"], "shipped": SHIPPED, "shipped-v2": SHIPPED_V2}[which]
    rows = check_costs(pkg, macs_rtol=MACS_RTOL)
    assert [r["part"] for r in rows][-1] == "full" and len(rows) >= 3
    for r in rows:
        assert r["onnx_macs"] == r["manifest_macs"], r
        assert r["onnx_params"] + r["onnx_conv_bias"] == r["manifest_params"], r
    # the check can fail: a manifest that overstates a segment's MACs by 1 % is refused
    m = json.loads((pkg / "manifest.json").read_text())
    m["segments"][0]["macs"] = int(m["segments"][0]["macs"] * 1.01)
    with pytest.raises(ValueError, match=f"{m['segments'][0]['id']} .*manifest macs"):
        check_costs(pkg, m)
    # and so is one that states fewer params than the graph holds
    m = json.loads((pkg / "manifest.json").read_text())
    m["backbone"]["params"] -= rows[0]["onnx_conv_bias"] + 1
    with pytest.raises(ValueError, match="backbone .*manifest params"):
        check_costs(pkg, m)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z.astype(np.float64))
    return e / e.sum(axis=1, keepdims=True)


def test_gain_zero_equals_segment_removed(trained):
    runner = PackageRunner(trained["pkg"])
    m = runner.manifest
    x, _ = _inputs(runner, trained["data"])
    k = len(m["categories"])
    for j, s in enumerate(m["segments"]):
        gains = np.ones((len(x), len(m["segments"])), np.float32)
        gains[:, j] = 0.0
        p_all = _softmax(runner.run_full(x, gains))
        keep = [c for c in range(k) if c not in s["categories"]]
        if not keep:
            continue
        # "removed": only the segments not under s run (cutout of the remaining categories)
        cols = runner.run_segments(runner.run_backbone(x), runner.needed_segments(keep))
        p_cut = _softmax(np.stack([cols[c] for c in keep], axis=1))
        assert np.abs(p_all[:, keep] - p_cut).max() <= 1e-6, s["id"]
        assert p_all[:, s["categories"]].max() <= 1e-6, s["id"]


def test_gain_adds_log_gain(trained):
    runner = PackageRunner(trained["pkg"])
    m = runner.manifest
    x, _ = _inputs(runner, trained["data"], n=16)
    base = runner.run_full(x)
    for j, s in enumerate(m["segments"]):
        gains = np.ones((len(x), len(m["segments"])), np.float32)
        gains[:, j] = 2.0
        diff = runner.run_full(x, gains) - base
        under = s["categories"]
        assert np.allclose(diff[:, under], np.log(2.0), atol=1e-4), s["id"]
        others = [c for c in range(len(m["categories"])) if c not in under]
        assert np.abs(diff[:, others]).max() <= 1e-5


def test_shipped_package():
    pkg = SHIPPED
    m = check_package(pkg)
    assert m["name"] == "fashion-mnist-nested"
    assert m["backbone"]["output_shape"] == [-1, 8, 7, 7]
    cloud = sum(s["params"] for s in m["segments"])
    for s in m["segments"]:
        if s["parent"] is None:
            sub = sum(t["params"] for t in m["segments"]
                      if t["id"] == s["id"] or t["id"].startswith(s["id"] + "."))
            assert 1 - sub / cloud >= 0.60, s["id"]
    size = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    assert size < 10e6


def test_tree_parsing():
    t = parse_tree({"categories": ["a", "b", "c", "d"],
                    "tree": [{"id": "x", "children": [{"id": "y", "children": ["a", "b"]}, "c"]},
                             {"id": "z", "children": ["d"]}]})
    assert [s.id for s in t.segments] == ["x", "x.y", "z"]
    assert t.by_id()["x"].categories == [0, 1, 2]
    assert t.needed_segments([1]) == ["x", "x.y"]
    with pytest.raises(ValueError):
        parse_tree({"categories": ["a", "b"], "tree": [{"id": "x", "children": ["a"]}]})  # b missing
    with pytest.raises(ValueError):
        parse_tree({"categories": ["a"], "tree": [{"id": "x", "children": ["a", "a"]}]})


def test_idx_roundtrip(tmp_path):
    import gzip
    import struct
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    with gzip.open(tmp_path / "t-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + arr.tobytes())
    assert np.array_equal(read_idx(tmp_path / "t-images-idx3-ubyte.gz"), arr)


def test_other_tree_and_rgb(tmp_path):
    """Nothing is tied to Fashion-MNIST: a toy tree (deeper nesting, mixed direct categories)
    on rgb 8x8 input, with a convolution at the bottleneck's resolution (backbone_low_widths),
    exports to a valid package whose composition equals full.onnx and whose manifest costs
    match the graphs (check_package)."""
    from spotlight_model.model import NestedNet
    from spotlight_model.package import export_package
    tree = parse_tree({"name": "toy", "categories": ["a", "b", "c", "d", "e"],
                       "tree": [{"id": "x", "channels": [6], "children": [
                           {"id": "y", "channels": [4], "children": [
                               {"id": "z", "channels": [4], "children": ["a", "b"]}, "c"]}, "d"]},
                           {"id": "w", "channels": [5], "children": ["e"]}]})
    torch.manual_seed(0)
    model = NestedNet(tree, in_channels=3, bottleneck=4, backbone_widths=(4, 4, 4),
                      backbone_low_widths=(3,)).eval()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.backbone.modules()) == 5
    export_package(model, tmp_path, name="toy", mean=[0.5] * 3, std=[0.25] * 3, image_shape=(3, 8, 8))
    m = check_package(tmp_path)
    assert [s["id"] for s in m["segments"]] == ["x", "x.y", "x.y.z", "w"]
    assert m["input"]["color"] == "rgb" and m["backbone"]["output_shape"] == [-1, 4, 2, 2]
    runner = PackageRunner(tmp_path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)
    g = rng.uniform(0, 2, size=(5, 4)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(g)).numpy()
    assert np.abs(runner.run_full(x, g) - ref).max() <= 1e-5
    assert np.abs(runner.composed_logits(x, g) - ref).max() <= 1e-5


def test_training_is_reproducible():
    """Same seed and data -> bit-identical weights (what makes `make model` re-runnable);
    a different seed gives different weights, so the comparison can fail. The returned
    model is back in the default memory format, as export expects."""
    from spotlight_model.model import NestedNet
    from spotlight_model.train import fit
    tree = parse_tree({"name": "toy", "categories": ["a", "b", "c"],
                       "tree": [{"id": "x", "channels": [6], "children": [
                           {"id": "y", "channels": [4], "children": ["a", "b"]}]},
                           {"id": "w", "channels": [5], "children": ["c"]}]})
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(size=(96, 1, 12, 12)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=96))

    def run(seed):
        torch.manual_seed(seed)
        model = NestedNet(tree, in_channels=1, bottleneck=4, backbone_widths=(4, 6, 6))
        state, _ = fit(model, x[:64], y[:64], x[64:], y[64:], mean=[0.5], std=[0.25], epochs=2,
                       batch_size=16, seed=seed, log=lambda *_: None)
        assert all(p.is_contiguous() for p in model.parameters())
        return state

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fused_branches_match_their_segments(trained):
    """export writes one fused graph per top-level segment with children, and check_branches
    (run by export) compares its logits with the segments'; a branch listing part of its
    subtree is refused."""
    from spotlight_model.package import check_branches
    pkg = trained["pkg"]
    m = json.loads((pkg / "manifest.json").read_text())
    tops = [s["id"] for s in m["segments"] if s["parent"] is None and s["children"]]
    assert [b["id"] for b in m["branches"]] == tops and tops
    check_branches(pkg, m)
    m["branches"][0]["segments"] = m["branches"][0]["segments"][:1]
    with pytest.raises(ValueError, match="whole subtree"):
        check_branches(pkg, m)


def test_card_reproduce_line_names_the_recipe():
    """The card's Reproduce command retrains the package it describes: v1 needs no options,
    v2 names its tree file (and epochs where they are not the default)."""
    from spotlight_model.evaluate import reproduce_args
    v1 = json.loads((SHIPPED / "manifest.json").read_text())
    v2 = json.loads((SHIPPED_V2 / "manifest.json").read_text())
    work = "--work build/model-work-fashion-mnist-nested-v2"
    assert reproduce_args(v1) == "--out models/fashion-mnist-nested"
    v2["training"].pop("distill", None)
    v2["training"].pop("distill_temperature", None)
    assert reproduce_args(v2) == ("--tree python/trees/fashion_mnist_v2.json --epochs 30 "
                                  f"{work} --out models/fashion-mnist-nested-v2")
    v2["training"].update(distill=0.5, distill_temperature=4.0)
    assert reproduce_args(v2) == ("--tree python/trees/fashion_mnist_v2.json --epochs 30 --distill 0.5 "
                                  f"{work} --out models/fashion-mnist-nested-v2")
    v2["training"]["distill_temperature"] = 2.0
    assert reproduce_args(v2).endswith(f"--distill 0.5 --distill-temperature 2.0 {work} "
                                       "--out models/fashion-mnist-nested-v2")
    del v2["training"]["distill"], v2["training"]["distill_temperature"]
    v2["training"]["epochs"] = 25
    assert reproduce_args(v2) == f"--tree python/trees/fashion_mnist_v2.json {work} --out models/fashion-mnist-nested-v2"


def test_ledger_rewrites_only_the_cards_test_set_section(tmp_path, trained):
    """`ledger` re-renders the card's test-set section from python/test_reads.json after an
    entry is added by hand, leaving the rest of the card (and the package) as it was."""
    import shutil
    from spotlight_model.cli import main
    from spotlight_model.evaluate import splice_test_reads
    pkg = tmp_path / "pkg"
    shutil.copytree(trained["pkg"], pkg)
    name = json.loads((pkg / "manifest.json").read_text())["name"]
    before = (pkg / "model_card.md").read_text()
    entry = {"kind": "recipe", "what": "a recipe written for this test", "commit": "abc1234",
             "nested": 0.9351, "baseline": 0.9402, "shipped": "yes", "note": "a note for this test"}
    ledger = tmp_path / "test_reads.json"
    ledger.write_text(json.dumps({"packages": {name: [entry]}}))
    main(["ledger", "--out", str(pkg), "--test-reads", str(ledger)])
    after = (pkg / "model_card.md").read_text()
    assert "| 1 | a recipe written for this test | abc1234 | 93.51 % | 94.02 % | yes |" in after
    assert "**1 training recipes**" in after and "a note for this test" in after
    head = before.split("## Test-set discipline")[0]
    assert after.startswith(head)
    # every other section is kept as it was, in its place
    others = [sec for sec in before.split("\n## ") if not sec.startswith("Test-set discipline")]
    assert [sec for sec in after.split("\n## ") if not sec.startswith("Test-set discipline")] == others
    check_package(pkg)
    with pytest.raises(ValueError, match="Test-set discipline"):
        splice_test_reads("# card\n\n## Reproduce\n", [entry], name)
    with pytest.raises(SystemExit, match="does not exist"):
        main(["ledger", "--out", str(pkg), "--test-reads", str(tmp_path / "missing.json")])


def test_distillation_learns_from_the_baseline(tmp_path, trained):
    """--distill trains the nested model against the baseline's logits: the checkpoint (and so
    the manifest) records the teacher, the weights differ from the same run without the term
    (it acts), a share outside [0, 1] is refused, and without a baseline checkpoint the flag
    is refused naming the file it looked for."""
    import shutil
    from spotlight_model.cli import main
    common = ["--data", str(trained["data"]), "--epochs", "1", "--limit", "512", "--val-size", "128",
              "--models", "nested"]
    plain, kd = tmp_path / "plain", tmp_path / "kd"
    for w in (plain, kd):
        w.mkdir()
        shutil.copy(trained["work"] / "baseline.pt", w / "baseline.pt")
    main(["train", *common, "--work", str(plain)])
    main(["train", *common, "--work", str(kd), "--distill", "0.7"])
    a = torch.load(plain / "nested.pt", map_location="cpu", weights_only=False)
    b = torch.load(kd / "nested.pt", map_location="cpu", weights_only=False)
    assert "distill" not in a["hparams"]
    assert b["hparams"]["distill"] == 0.7 and b["hparams"]["distill_temperature"] == 4.0
    assert b["hparams"]["teacher"].startswith("baseline (val_acc ")
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    with pytest.raises(SystemExit, match="must be in"):
        main(["train", *common, "--work", str(kd), "--distill", "1.5"])
    with pytest.raises(SystemExit, match="must be > 0"):
        main(["train", *common, "--work", str(kd), "--distill", "0.5", "--distill-temperature", "0"])
    with pytest.raises(SystemExit, match="baseline.pt"):
        main(["train", *common, "--work", str(tmp_path / "none"), "--distill", "0.5"])
