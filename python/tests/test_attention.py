import json

import numpy as np

from conftest import REPO
from spotlight_model import attention as attn
from spotlight_model.evaluate import read_test_reads, splice_card


def test_signals_are_right_as_often_as_stated():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=20000)
    for p in (1.0, 0.8, 0.6):
        named = attn.draw_signal(true, 3, p, rng)
        assert abs((named == true).mean() - p) < 0.01, p
        assert set(np.unique(named)) <= {0, 1, 2}
    named = attn.draw_signal(true, 3, None, rng)
    assert abs((named == true).mean() - 1 / 3) < 0.01
    # a wrong signal is spread over the wrong groups
    wrong = named[named != true]
    assert len(np.unique(wrong)) == 3


def test_group_gains_and_prior():
    named = np.array([0, 2])
    g = attn.group_gains(named, 3, "enhance", 2.0)
    assert g.tolist() == [[2, 1, 1], [1, 1, 2]]
    g = attn.group_gains(named, 3, "inhibit", 0.0)
    assert g.tolist() == [[1, 0, 0], [0, 0, 1]]
    logits = np.zeros((2, 4), np.float32)
    group_of = np.array([0, 0, 1, 2])
    p = attn.with_prior(logits, g, group_of)
    assert p[0, :2].tolist() == [0, 0] and np.isneginf(p[0, 2:]).all()


def test_study_tells_a_prior_from_a_network_that_reshapes():
    """With a network whose gains only add ln g, every row agrees with the prior; with one whose
    gains also reorder categories inside a group, the study reports the disagreements."""
    rng = np.random.default_rng(1)
    n, group_of = 3000, np.array([0, 0, 1, 1, 2, 2])
    y = rng.integers(0, 6, size=n)
    logits = rng.normal(size=(n, 6)).astype(np.float32)
    logits[np.arange(n), y] += 1.5
    as_prior = lambda gm: attn.with_prior(logits, gm, group_of)  # noqa: E731
    a = attn.study(as_prior, logits, y, group_of)
    assert len(a["rows"]) == len(attn.RELIABILITIES) * (len(attn.ENHANCE_GAINS) + len(attn.INHIBIT_GAINS))
    assert all(r["prediction_disagreements"] == 0 and r["nested"] == r["nested_prior"] for r in a["rows"])
    best = [r for r in a["rows"] if r["signal"] == "correct" and r["mode"] == "inhibit" and r["gain"] == 0][0]
    assert best["nested"] > a["none"]["nested"]

    def reshapes(gm):  # a gain that also favours the first category of its group
        z = attn.with_prior(logits, gm, group_of)
        return z + 3.0 * np.log1p(gm[:, group_of]) * (np.arange(6) % 2 == 0)
    b = attn.study(reshapes, logits, y, group_of)
    assert sum(r["prediction_disagreements"] for r in b["rows"]) > 0
    text = "\n".join(attn.render(b, n))
    assert "do more than a log-prior" in text


def test_trained_evaluation_has_the_controls(trained):
    r = json.loads(trained["results"].read_text())
    a = r["attention"]
    assert len(a["rows"]) == 28
    # the smoke model has the same head: its gains are a log-prior too
    assert all(row["prediction_disagreements"] == 0 for row in a["rows"])
    assert all(row["baseline_prior"] is not None for row in a["rows"])
    card = (trained["pkg"] / "model_card.md").read_text()
    assert "## Top-down attention (gains), with controls" in card and "## Test-set discipline" in card


def test_splice_keeps_the_rest_of_the_card():
    card = "# t\n\nintro, which is used only here. x\n\n## A\n\na\n\n## Top-down attention (gains)\n\nOLD-SECTION-TEXT\n\n## Bottleneck\n\nb\n"
    rows = [{"mode": m, "gain": g, "signal": lab, "p_right": p, "signal_correct": 1.0, "nested": 0.5,
             "nested_prior": 0.5, "prediction_disagreements": 0, "max_abs_logit_diff": 0.0, "baseline_prior": None}
            for m, gs in (("enhance", attn.ENHANCE_GAINS), ("inhibit", attn.INHIBIT_GAINS)) for g in gs
            for p, lab in attn.RELIABILITIES]
    r = {"attention": {"none": {"nested": 0.5, "baseline": None}, "rows": rows, "n_groups": 3, "seed": 0},
         "test_images": 10, "test_reads": read_test_reads(REPO / "python/test_reads.json", "fashion-mnist-nested")}
    out = splice_card(card, r, {"name": "fashion-mnist-nested"})
    assert out.startswith("# t\n") and "## A\n\na\n" in out and out.endswith("## Bottleneck\n\nb\n")
    assert "OLD-SECTION-TEXT" not in out and "which only `evaluate` reads" in out
    assert "**3 training recipes**" in out
    again = splice_card(out, r, {"name": "fashion-mnist-nested"})
    assert again == out
