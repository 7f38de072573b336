"""The copy-probe pilot (analyses/copy_probe_pilot.py) on a tiny model: its figures recomputed by hand from
its predictions, and its keep rule on hand-made results."""


import pytest

from mechcopy.tasks.copy_probe import CopyProbeConfig, build_copy_probe
from conftest import analysis_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    return analysis_script("copy_probe_pilot")


def test_pilot_figures_by_hand(script, tiny):
    tasks = ("max_digit", "repeated_symbol")
    res = script.pilot(tiny, n=12, tasks=tasks)
    for construction in script.CONSTRUCTIONS:
        probe = build_copy_probe(tiny.tokenizer, CopyProbeConfig(tasks, construction, n_attr=12))
        for t in tasks:
            block = res["tasks"][t][construction]
            prompts, preds = probe.split("attribution", t), block["predictions"]
            assert len(preds) == len(prompts) == block["n"] == 12
            labels = res["tasks"][t]["labels"]
            assert block["accuracy"] == sum(a == p.answer for a, p in zip(preds, prompts)) / 12
            assert block["copy_rate"] == sum(a != p.answer and a in p.demo_labels for a, p in zip(preds, prompts)) / 12
            assert block["outside_labels"] == sum(a not in labels for a in preds) / 12
            if construction == "no-gold":
                wrong_in = [(a, p) for a, p in zip(preds, prompts) if a in labels and a != p.answer]
                share = block["demo_share"]
                assert share["n_wrong"] == len(wrong_in)
                assert share["n_demo"] == sum(a in p.demo_labels for a, p in wrong_in)
                if wrong_in:
                    chance = [len(set(p.demo_labels)) / (len(labels) - 1) for _, p in wrong_in]  # gold never shown
                    assert share["chance"] == pytest.approx(sum(chance) / len(chance))
            if construction == "copy-control":
                assert "copy_effect" in block


def _share(share, chance, p):
    return {"share": share, "chance": chance, "p_value": p}


def test_keep_rule(script):
    def result(shares, accuracies):
        return {"tasks": {t: {"labels": ["a", "b", "c", "d"], "no-gold": {"demo_share": shares[t]},
                              "standard": {"accuracy": accuracies[t]}} for t in shares}}

    models = {
        "m1": result({"copies": _share(0.9, 0.6, 0.001), "avoids": _share(0.9, 0.6, 0.001),
                      "chance": _share(0.65, 0.6, 0.5), "unlearnt": _share(0.9, 0.6, 0.001)},
                     {"copies": 0.6, "avoids": 0.6, "chance": 0.9, "unlearnt": 0.3}),
        "m2": result({"copies": _share(0.6, 0.6, 1.0), "avoids": _share(0.2, 0.6, 0.01),
                      "chance": _share(None, None, None), "unlearnt": _share(0.9, 0.6, 0.001)},
                     {"copies": 0.1, "avoids": 0.6, "chance": 0.9, "unlearnt": 0.49}),
    }
    kept, dropped = script.keep(models)
    assert kept == ["copies"]
    assert dropped["avoids"] == "the demo share is below chance (p < 0.05) for m2"
    assert dropped["chance"] == "the demo share is not above chance (p < 0.05) for any model"
    assert dropped["unlearnt"] == "standard accuracy is below twice chance (0.50) for every model"
