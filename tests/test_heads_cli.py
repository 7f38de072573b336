"""Heads on the command line: `find --components heads` writes a head file (its own k grid within the
model's head count), and `evaluate --prune` of a head file gives the same predictions as zeroing (or
mean-ablating) those heads' `hook_z` by hand, with size-matched random head sets."""

import json

import pytest
import torch

from mechcopy import heads as H
from mechcopy.components import Components
from mechcopy.evaluation import predict
from mechcopy.models.tiny import tiny_transformer
from mechcopy.suite import build_prompt_sets
from mechcopy.tasks import load_tasks

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = ["--tasks", "to_upper,next_letter", "--n", "6", "--shots", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def gqa():
    """Grouped-query attention, as both zoo models: 4 query heads over 2 key/value heads."""
    return tiny_transformer(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=5, n_key_value_heads=2)


@pytest.fixture
def cli(gqa, monkeypatch):
    import mechcopy.models
    from mechcopy.commands import main

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: gqa)
    return main


def _prompts(model):
    sets = build_prompt_sets(model, load_tasks("to_upper,next_letter"), shots=2, n=6, seed=1)
    return {name: ps.prompts for name, ps in sets.items()}


def _rows(path):
    return {(r["task"], r["condition"]): r for r in json.loads(path.read_text())["results"]}


def test_find_heads_writes_a_head_file(cli, gqa, tmp_path):
    out = tmp_path / "heads.json"
    assert cli(["find", "--components", "heads", "--n", "4", "--n-dev", "4", "--shots", "2", "--steps", "4",
                "--ppl-tokens", "64", "--max-ppl-increase", "10", "--consistency-random", "0",
                "--out", str(out)]) == 0
    obj = json.loads(out.read_text())
    assert "heads" in obj and "neurons" not in obj
    heads = Components.load(out)
    assert heads.kind == "head"
    sweep = obj["meta"]["sweep"]
    # the head grid, cut to the model's 8 heads: 1, 2, 3, 5 (10 and more are dropped)
    assert [r["k"] for r in sweep["rows"]] == [1, 2, 3, 5]
    assert len(heads) == sweep["chosen_k"] and obj["meta"]["intervention"] == {"ablation": "zero", "positions": "all"}
    assert all(0 <= l < 2 and 0 <= h < 4 for l, h in heads.pairs)
    from mechcopy.attribution import CopyScores

    s = CopyScores.load(obj["meta"]["scores_path"])
    assert s.kind == "head" and tuple(s.scores.shape) == (2, 4)
    s.check(gqa)


def test_find_heads_refuses_mamba(mamba, monkeypatch, tmp_path, capsys):
    import mechcopy.models
    from mechcopy.commands import main

    monkeypatch.setattr(mechcopy.models, "load_model", lambda name, **kw: mamba)
    assert main(["find", "--components", "heads", "--n", "2", "--n-dev", "2", "--shots", "2", "--steps", "2",
                 "--ppl-tokens", "64", "--out", str(tmp_path / "h.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert err == "mechcopy find: error: this model has no heads: a mamba model has no attention"


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_evaluate_prune_heads_equals_hook_z_by_hand(cli, gqa, tmp_path, ablation):
    chosen = [(0, 1), (1, 2), (1, 3)]
    path = H.head_set(gqa, chosen, {"k": 3}).save(tmp_path / "heads.json")
    out = tmp_path / "e.json"
    assert cli(["evaluate", *EVAL, "--prune", str(path), "--n-random", "1", "--ablation", ablation,
                "--out", str(out)]) == 0
    rows, settings = _rows(out), json.loads(out.read_text())["settings"]
    assert settings["kind"] == "head" and settings["ablation"] == ablation and settings["positions"] == "all"
    prompts = _prompts(gqa)
    means = {}
    if ablation == "mean":                       # the heads' mean z over every position of the evaluated prompts
        zs = {l: [] for l in (0, 1)}
        with torch.no_grad():
            for ps in prompts.values():
                for p in ps:
                    _, cache = gqa.run_with_cache(p.text)
                    for l in zs:
                        zs[l].append(cache[f"blocks.{l}.attn.hook_z"][0])
        means = {l: torch.cat(z).mean(0) for l, z in zs.items()}
        assert settings["means"]["kind"] == "head" and settings["means"]["n_prompts"] == 12

    def by_hand(layer, hs):
        def hook(z, hook):
            z = z.clone()
            z[:, :, hs] = 0.0 if ablation == "zero" else means[layer][hs].to(z)
            return z
        return (f"blocks.{layer}.attn.hook_z", hook)

    hand = [by_hand(0, [1]), by_hand(1, [2, 3])]
    for task, ps in prompts.items():
        want = predict(gqa, ps, fwd_hooks=hand, pad=False)
        assert list(rows[(task, "pruned")]["predictions"]) == want, task
        assert list(rows[(task, "unpruned")]["predictions"]) == predict(gqa, ps, pad=False)
    assert any(rows[(t, "pruned")]["predictions"] != rows[(t, "unpruned")]["predictions"] for t in prompts)


def test_evaluate_heads_with_size_matched_random_sets(cli, gqa, tmp_path):
    path = H.head_set(gqa, [(0, 0), (1, 1)], {"k": 2}).save(tmp_path / "heads.json")
    out = tmp_path / "e.json"
    assert cli(["evaluate", *EVAL, "--prune", str(path), "--n-random", "2", "--random-match", "size",
                "--positions", "last", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["sizes"]["kind"] == "head" and settings["positions"] == "last"
    for name in ("random-1", "random-2"):
        rs = settings["random_sets"][name]
        assert rs["match"] == "size" and set(rs["size_ratio"]) == {"0", "1"}
    # the random sets are heads, one per layer as the set has, never the set's own
    rows = _rows(out)
    assert {c for _, c in rows} >= {"unpruned", "pruned", "random-1", "random-2"}


def test_evaluate_ablation_flags_need_prune(cli, capsys):
    assert cli(["evaluate", *EVAL, "--ablation", "mean"]) != 0
    assert "--ablation and --positions say how the --prune set is ablated" in capsys.readouterr().err


def test_patch_per_head_equals_the_library(cli, gqa, tmp_path, capsys):
    from mechcopy.head_patching import HeadPatchingResult, task_head_patching

    out = tmp_path / "p.json"
    assert cli(["patch", "--task", "to_upper", "--per-head", "--n", "3", "--shots", "3", "--seed", "2",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = HeadPatchingResult.from_json({k: v for k, v in json.loads(out.read_text()).items()
                                        if k in HeadPatchingResult.__dataclass_fields__ or k == "gap"})
    want = task_head_patching(gqa, load_tasks("to_upper")[0], "shuffled_labels", n=3, shots=3, seed=2)
    assert got.columns == ("all",) and torch.allclose(got.array(), want.array(), atol=1e-6)
    assert got.array().shape == (2, 1, 4) and "per head (z)" in printed and "largest |normalised|" in printed
    assert cli(["patch", "--task", "to_upper", "--per-head", "--method", "tl", "--out", str(tmp_path / "q.json")]) != 0
    assert "--per-head patches every head with its own loop" in capsys.readouterr().err


def test_every_evaluate_row_carries_its_prompts(cli, gqa, tmp_path):
    path = H.head_set(gqa, [(1, 0)], {"k": 1}).save(tmp_path / "heads.json")
    out = tmp_path / "e.json"
    assert cli(["evaluate", *EVAL, "--prune", str(path), "--n-random", "1", "--out", str(out)]) == 0
    prompts = _prompts(gqa)
    for (task, condition), row in _rows(out).items():
        records = row["per_prompt"]
        assert [r["prompt"] for r in records] == [p.text for p in prompts[task]]
        assert [r["answer"] for r in records] == [p.answer for p in prompts[task]]
        assert [r["demo_labels"] for r in records] == [list(p.demo_labels) for p in prompts[task]]
        assert [r["prediction"] for r in records] == list(row["predictions"])
        # the outcome recomputed from the records alone
        correct = [r["prediction"] == r["answer"] for r in records]
        assert abs(sum(correct) / len(correct) - row["accuracy"]) < 1e-9
