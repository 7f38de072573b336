"""analyses/organism_heads.py on a tiny organism-sized model (2 layers x 4 heads): one head's mean ablation
against a hand-written hook, the rankings / yes-no rule on a hand-made example, Spearman by hand, the shift
probe's label swaps staying within the prompt's shift, the zero-baseline fallback, and a whole organism run."""


import pytest
import torch

from mechcopy.organisms import probe_splits
from mechcopy.organisms.data import LETTERS
from conftest import analysis_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def oh():
    return analysis_script("organism_heads")


@pytest.fixture(scope="module")
def splits(tiny):
    return probe_splits(tiny.tokenizer, 10, 4, 12, 4, 0, probe="probe-shift")


def test_single_head_ablation_equals_a_hand_written_hook(oh, tiny, splits):
    attribution, _, test = splits
    got = oh.single_head_ablations(tiny, attribution, test)
    layer, head = 1, 2
    # the head's mean z over every position of the attribution prompts, by hand
    zs = [tiny.run_with_cache(p.text, names_filter=f"blocks.{layer}.attn.hook_z")[1][f"blocks.{layer}.attn.hook_z"][0]
          for p in attribution]
    mean = torch.cat(zs).double().mean(0)[head].float()

    def hook(z, hook):
        z[:, :, head] = mean
        return z

    tokens = torch.stack([tiny.to_tokens(p.text)[0] for p in test])
    with torch.no_grad():
        clean = tiny(tokens)[:, -1]
        ablated = tiny.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])[:, -1]
    deltas, copies = [], []
    for p, c, a in zip(test, clean, ablated):
        gold = int(p.answer_ids[0])
        demo = sorted({int(ids[0]) for ids in p.demo_label_ids} - {gold})
        x = demo[int(c[demo].argmax())]              # the demo label the unablated run prefers
        deltas.append(float((a[x] - a[gold]) - (c[x] - c[gold])))
        pred = int(a.argmax())
        copies.append(pred != gold and pred in demo)
    row = got["heads"][f"L{layer}H{head}"]
    assert row["delta_T"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-5)
    assert row["copy_rate"] == pytest.approx(sum(copies) / len(copies))
    assert set(got["heads"]) == {f"L{l}H{h}" for l in range(2) for h in range(4)}
    assert got["unablated"]["n"] == len(test)


def test_rankings_answer_and_spearman_by_hand(oh):
    names = ["L0H0", "L0H1", "L1H0", "L1H1"]
    ablation = {n: {"delta_T": d} for n, d in zip(names, [-0.5, 0.1, -2.0, -0.2])}
    attribution = {n: {"score": s, "eligible": True} for n, s in zip(names, [0.2, 0.9, 0.8, 0.1])}
    got = oh.compare(ablation, attribution, copy_rate=0.5)
    assert got["ground_truth_ranking"] == ["L1H0", "L0H0", "L1H1", "L0H1"]
    assert got["attribution_ranking"] == ["L0H1", "L1H0", "L0H0", "L1H1"]
    assert got["answer"] == "no" and got["counted"]
    assert (got["delta_T_top_ground_truth"], got["delta_T_top_attribution"]) == (-2.0, 0.1)
    # ranks (1 = largest fall of T / highest score): truth 2, 4, 1, 3; attribution 3, 1, 2, 4
    d2 = sum((a - b) ** 2 for a, b in zip([2, 4, 1, 3], [3, 1, 2, 4]))
    assert got["spearman"] == pytest.approx(1 - 6 * d2 / (4 * (4 ** 2 - 1)))
    attribution["L1H0"]["score"] = 1.0              # now the largest fall is the top head
    assert oh.compare(ablation, attribution, copy_rate=0.5)["answer"] == "yes"
    attribution["L1H0"]["eligible"] = False         # a head whose layer failed IG's gate cannot top the ranking
    assert oh.compare(ablation, attribution, copy_rate=0.5)["attribution_ranking"][-1] == "L1H0"
    assert not oh.compare(ablation, attribution, copy_rate=0.14)["counted"]
    pooled = oh.summarise([{"organism": "a", "counted": True, "answer": "yes"},
                           {"organism": "b", "counted": True, "answer": "no"},
                           {"organism": "c", "counted": False, "answer": "yes"}])
    assert (pooled["copying"], pooled["yes"]) == (2, 1)


def test_label_swaps_stay_within_the_shift(oh, tiny, splits):
    from mechcopy.tasks.pairs import label_swaps

    prompts = oh.by_function(splits[0])
    swaps, dropped = label_swaps(prompts, tiny.tokenizer, seed=0)
    assert len(swaps) + len(dropped) == len(prompts) and swaps
    for w in swaps:
        s = int(w.clean.task.rsplit("-", 1)[1])
        for x, y in (*w.counterfactual.demos, (w.counterfactual.query, w.counterfactual.answer)):
            assert LETTERS[(LETTERS.index(x) + s) % 26] == y
        assert w.x not in w.counterfactual.demo_labels and w.z not in w.clean.demo_labels


def test_attribution_falls_back_to_zero_without_a_swap(oh, tiny, splits):
    one = splits[0][:1]          # alone, a prompt has no other pair of its shift to swap in
    got = oh.attribute_heads(tiny, one, {**oh.SETTINGS, "steps": 4})
    assert got["baseline"] == "zero" and got["n_prompts"] == 1
    two = oh.attribute_heads(tiny, splits[0], {**oh.SETTINGS, "steps": 4})
    assert two["baseline"] == "label-swap counterfactual"
    assert two["n_prompts"] + two["n_dropped"] == len(splits[0])


def test_run_organism_on_a_saved_organism(oh, tmp_path):
    from mechcopy.organisms import TrainConfig, train_organism

    cfg = TrainConfig(arch="transformer", steps=2, batch_size=4, seed=1, eval_every=10_000,
                      model_kwargs={"n_layers": 2, "d_model": 16, "n_heads": 4, "d_mlp": 32, "n_ctx": 64})
    train_organism(cfg, tmp_path / "org", progress=False)
    settings = {**oh.SETTINGS, "n_attr": 8, "n_dev": 4, "n_test": 8, "steps": 4}
    r = oh.run_organism(tmp_path / "org", settings)
    assert r["seed"] == 1 and r["training"]["steps_done"] == 2
    assert sorted(r["ground_truth_ranking"]) == sorted(r["attribution_ranking"]) == sorted(r["heads"])
    assert r["answer"] == ("yes" if r["ground_truth_ranking"][0] == r["attribution_ranking"][0] else "no")
    rep = oh.reproduction([r])["rows"][0]
    assert rep["documented"]["test_accuracy"] == oh.DOCUMENTED["test_accuracy"][1]
