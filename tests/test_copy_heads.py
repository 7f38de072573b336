"""analyses/copy_heads.py (the study's top heads: label attention, OV check, activation patching): the top-k
and percentile logic against hand examples, the patching effect against a hand-written hook and against
`head_patching.patch_heads`, the Spearman summary by hand, and the script end to end on a tiny model."""

import json

import numpy as np
import pytest
import torch
from conftest import analysis_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heads_script():
    return analysis_script("copy_heads")


def test_top_heads_by_hand(heads_script):
    sels = [{"seed": 0, "scores_top": [[1, 0, 0.9], [0, 2, 0.8], [1, 3, 0.5], [0, 1, 0.3]]},
            {"seed": 1, "scores_top": [[0, 2, 1.0], [1, 0, 0.6], [1, 3, 0.4], [1, 1, 0.35]]}]
    # complete means: L1H0 0.75, L0H2 0.9, L1H3 0.45; L0H1 at most (0.3 + 0.35) / 2, L1H1 at most (0.3 + 0.35) / 2
    top, means, check = heads_script.top_heads(sels, k=2)
    assert top == [(0, 2), (1, 0)]
    assert means[(1, 3)] == pytest.approx(0.45) and (0, 1) not in means
    assert check["kth_mean"] == pytest.approx(0.75) and check["max_bound_outside"] == pytest.approx(0.325)
    top3, _, _ = heads_script.top_heads(sels, k=3)          # 0.45 is above every bound (0.325)
    assert top3[-1] == (1, 3)
    sels[1]["scores_top"][-1] = [1, 1, 0.7]                  # L1H1 could now reach (0.3 + 0.7) / 2 = 0.5 > 0.45
    with pytest.raises(ValueError, match="not determined"):
        heads_script.top_heads(sels, k=3)
    with pytest.raises(ValueError, match="only 3 heads"):
        heads_script.top_heads(sels, k=4)
    # every head of a 1 x 3 model stored: nothing outside the rows, so the floor bound does not apply
    full = [{"seed": 0, "scores_top": [[0, 0, 0.5], [0, 1, 0.4], [0, 2, 0.1]]},
            {"seed": 1, "scores_top": [[0, 0, 0.3], [0, 1, 0.2], [0, 2, 0.1]]}]
    with pytest.raises(ValueError, match="not determined"):
        heads_script.top_heads(full, k=3)      # the 3rd mean, 0.1, is what an unstored head could reach (the floors)
    top, _, check = heads_script.top_heads(full, k=3, n_heads=3)
    assert top == [(0, 0), (0, 1), (0, 2)] and check["max_bound_outside"] == float("-inf")


def test_percentile_and_standing_by_hand(heads_script):
    assert heads_script.percentile(3.0, [1, 2, 3, 4]) == pytest.approx(62.5)     # 2 below, 1 tie of 4
    assert heads_script.percentile(9.0, [1, 2, float("nan")]) == pytest.approx(100.0)
    assert heads_script.percentile(0.0, [1, 2]) == 0.0
    values = np.array([[0.1, 0.5, 0.2], [0.9, 0.3, 0.4]])
    got = heads_script.standing(values, [(1, 0), (0, 2)])
    # the others: 0.1, 0.5, 0.3, 0.4 -> 0.9 above all four, 0.2 above one
    assert got == [{"value": 0.9, "percentile": 100.0}, {"value": 0.2, "percentile": 25.0}]


def _swaps(model, n_test: int = 6):
    from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe
    from mechcopy.tasks.pairs import label_swaps

    probe = build_copy_probe(model.tokenizer, CopyProbeConfig(("max_digit", "repeated_symbol"), "no-gold", n_attr=0,
                                                              n_dev=0, n_test=n_test))
    swaps, _ = label_swaps(probe.test, model.tokenizer, seed=0)
    assert swaps
    return swaps


def test_patch_effects_equal_a_hand_hook_and_patch_heads(heads_script, tiny):
    from mechcopy.head_patching import patch_heads

    heads = [(0, 1), (1, 3), (1, 0)]
    for swap in _swaps(tiny)[:3]:
        got = heads_script.patch_effects(tiny, swap, heads)
        clean, cf = tiny.to_tokens(swap.clean.text), tiny.to_tokens(swap.counterfactual.text)

        def t(logits):
            return float(logits[0, -1, swap.x_id] - logits[0, -1, swap.gold_id])

        with torch.no_grad():
            t_clean = t(tiny(clean))
            assert got["t_clean"] == pytest.approx(t_clean, abs=1e-5) and got["t_cf"] == pytest.approx(t(tiny(cf)), abs=1e-5)
            _, cache = tiny.run_with_cache(cf)
            for i, (l, h) in enumerate(heads):
                def by_hand(z, hook, l=l, h=h):       # the counterfactual's z of head h at the last position
                    z = z.clone()
                    z[0, -1, h] = cache[f"blocks.{l}.attn.hook_z"][0, -1, h]
                    return z
                patched = tiny.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.attn.hook_z", by_hand)])
                assert got["last"][i] == pytest.approx(t(patched) - t_clean, abs=1e-5)
        # every position: mechcopy's per-head patching of all heads (itself tested against TransformerLens)
        every = patch_heads(tiny, cf, clean, lambda lg: lg[:, swap.x_id] - lg[:, swap.gold_id])
        assert got["all"] == pytest.approx([float(every[l, h]) - t_clean for l, h in heads], abs=1e-5)
        assert any(abs(v) > 1e-4 for v in got["last"] + got["all"])   # the check is not vacuous


def test_patching_summary_by_hand(heads_script):
    pairs = [{"t_clean": 2.0, "t_cf": 0.0, "last": [-1.0, -0.2, 0.1], "all": [-2.0, 0.0, -1.0]},
             {"t_clean": 4.0, "t_cf": 1.0, "last": [-3.0, -0.4, 0.3], "all": [-2.0, -1.0, -2.0]}]
    s = heads_script.patching_summary({"pairs": pairs, "n_dropped": 1}, scores=[0.9, 0.5, 0.1])
    assert s["gap_mean"] == pytest.approx(2.5) and s["n_pairs"] == 2
    assert s["last"]["mean"] == pytest.approx([-2.0, -0.3, 0.2])
    assert s["last"]["se"][0] == pytest.approx(1.0)                    # sd of (-1, -3) is sqrt(2), / sqrt(2)
    assert s["last"]["rank"] == [1, 2, 3] and s["last"]["spearman"] == pytest.approx(1.0)
    assert s["last"]["share_of_gap"] == pytest.approx([0.8, 0.12, -0.08])
    # all positions: means -2, -0.5, -1.5 -> -dT ranks 1, 3, 2 against scores 1, 2, 3: rho = 0.5
    assert s["all"]["rank"] == [1, 3, 2] and s["all"]["spearman"] == pytest.approx(0.5)


def test_script_end_to_end_on_a_tiny_model(heads_script, tiny, tmp_path, monkeypatch):
    import mechcopy

    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 4))
    for seed in range(3):     # every head stored on every seed: the top 3 is determined
        scores = base + 0.01 * rng.normal(size=(2, 4))
        rows = sorted(([l, h, float(scores[l, h])] for l in range(2) for h in range(4)), key=lambda r: -r[2])
        (work / f"heads-last_select_seed{seed}.json").write_text(json.dumps({"seed": seed, "scores_top": rows}))
    study = heads_script.study_module()
    study.SETTINGS = {**study.SETTINGS, "n_test": 4, "heldout_tasks": ["chemical_state", "sentiment_binary"], "n": 3}
    monkeypatch.setattr(study, "probe_tasks", lambda model, pilot: (["max_digit", "repeated_symbol"], "tiny"))
    monkeypatch.setattr(heads_script, "study_module", lambda: study)
    monkeypatch.setattr(mechcopy, "load_model", lambda name: tiny)
    args = ["--model", "tiny", "--work", str(work), "--k", "3", "--out-dir", str(tmp_path / "out"),
            "--data", str(tmp_path / "data"), "--figures", str(tmp_path / "fig")]
    assert heads_script.main(args) == 0
    d = json.loads((tmp_path / "data" / "copy_mechanism_heads_tiny.json").read_text())
    order = np.argsort(-base.ravel())[:3]
    assert [r["head"] for r in d["heads"]] == [f"L{i // 4}H{i % 4}" for i in order]
    assert d["labels"]["probe_test"]["n_prompts"] == 8 and d["labels"]["heldout"]["n_prompts"] == 6
    assert len(d["labels"]["heldout"]["maps"]["to_labels"]) == 2 and d["patching"]["n_pairs"] >= 1
    assert all(0 <= r["heldout_to_labels_pct"] <= 100 for r in d["heads"])
    assert (tmp_path / "fig" / "copy_mechanism_heads_tiny.png").exists()
    assert (tmp_path / "out" / "patch_probe_test.json").exists() and d["git_revision"]


def test_script_recomputes_scores_the_selections_do_not_determine(heads_script, tiny, tmp_path, monkeypatch):
    import mechcopy

    study = heads_script.study_module()
    study.SETTINGS = {**study.SETTINGS, "n_attr": 3, "n_dev": 4, "n_test": 4, "steps": 2, "hs": [2], "ppl_tokens": 64,
                      "max_ppl_increase": 10.0, "heldout_tasks": ["chemical_state"], "n": 3,
                      "probe_tasks": ["max_digit", "repeated_symbol"]}
    monkeypatch.setattr(study, "probe_tasks", lambda model, pilot: (["max_digit", "repeated_symbol"], "tiny"))
    monkeypatch.setattr(heads_script, "study_module", lambda: study)
    monkeypatch.setattr(mechcopy, "load_model", lambda name: tiny)
    work = tmp_path / "work"
    work.mkdir()
    full = {}
    for seed in range(3):        # the study's own select path, its stored rows cut to one head
        sel = study.select_heads_seed(tiny, seed, study.SETTINGS, positions="last")
        full[seed] = {(l, h): v for l, h, v in sel["scores_top"]}
        sel["scores_top"] = sel["scores_top"][:1]
        (work / f"heads-last_select_seed{seed}.json").write_text(json.dumps(sel))
    args = ["--model", "tiny", "--work", str(work), "--k", "3", "--out-dir", str(tmp_path / "out"),
            "--data", str(tmp_path / "data"), "--figures", str(tmp_path / "fig")]
    assert heads_script.main(args) == 0
    d = json.loads((tmp_path / "data" / "copy_mechanism_heads_tiny.json").read_text())
    assert d["attribution"]["scores_from"].startswith("every head's score computed again")
    assert max(d["attribution"]["stored_vs_recomputed_max_abs"]) < 1e-4
    means = {k: np.mean([full[s][k] for s in range(3)]) for k in full[0]}       # by hand, from the study's scores
    assert [r["head"] for r in d["heads"]] == [f"L{l}H{h}" for l, h in sorted(means, key=lambda k: -means[k])[:3]]
    assert set(d["seconds"]) >= {"scores_seed0", "scores_seed2", "patch_probe_test"}


def test_head_maps_outline_the_given_heads():
    from matplotlib.patches import Rectangle

    from mechcopy.viz import plot_head_maps

    values = np.arange(12, dtype=float).reshape(3, 4)
    fig = plot_head_maps({"a map\nsecond line": {"values": values, "outline": [(0, 1), (2, 0)]}})
    ax = fig.axes[0]
    boxes = sorted((int(r.get_y() + 0.5), int(r.get_x() + 0.5)) for r in ax.patches if isinstance(r, Rectangle))
    assert boxes == [(0, 1), (2, 0)]                 # the given heads, not the largest values (L2H3, ...)
    assert ax.get_title() == "a map\nsecond line\nL0H1, L2H0"


@pytest.mark.parametrize("option", ["--k", "--n", "--n-test", "--threads"])
def test_copy_heads_refuses_a_bad_number_before_the_model_loads(heads_script, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        heads_script.main(["--work", str(tmp_path), option, "0"])
    assert e.value.code == 2 and f"{option}: must be an integer >= 1" in capsys.readouterr().err
