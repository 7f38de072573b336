"""Model organisms: data generator properties, a tiny training run that learns held-out functions,
a save/load round trip with identical logits, and the full method (and its summary over seeds)."""

import random

import pytest
import torch

from mechcopy.organisms import data as D
from mechcopy.organisms.train import TrainConfig, load_organism, quick_accuracy, save_organism, train_organism

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    from mechcopy.models.tiny import char_tokenizer

    return char_tokenizer()


def test_functions_are_what_they_claim():
    shift = D.make_function("shift", 3)
    assert shift("a") == "d" and shift("y") == "b"
    cls = D.make_function("class", 1)
    assert [cls(x) for x in "abcde"] == ["5", "6", "7", "8", "5"] and cls.labels == ("5", "6", "7", "8")
    with pytest.raises(ValueError, match="permutation"):
        D.make_function("map", "abc")


def test_held_out_functions_never_sampled_in_training():
    rng = random.Random(0)
    train = {D.sample_function(f, rng, "train").name for f in ("map", "shift") for _ in range(400)}
    held = {D.sample_function(f, rng, "heldout").name for f in ("map", "shift") for _ in range(400)}
    assert train and held and not (train & held)
    assert all(not D.is_held_out(D.make_function(*n.split("-", 1))) for n in train)
    assert all(D.is_held_out(D.make_function(*n.split("-", 1))) for n in held)
    # the criterion is a property of the function, not of the sampler: both splits are non-trivial
    assert {n.split("-")[0] for n in held} == {"map", "shift"}
    # the training batches use only training functions (shifts visible in the text)
    codec_rng = random.Random(1)
    for _ in range(200):
        ep = D.sample_episode(D.sample_function("shift", codec_rng, "train"), 3, codec_rng)
        x, y = ep.demos[0]
        assert (ord(y) - ord(x)) % 26 not in D.HELD_OUT_SHIFTS


def test_probe_gold_never_among_demo_labels_and_answers_correct():
    for ep in D.episodes("probe", 300, shots=4, seed=3):
        assert ep.query[1] not in ep.demo_labels
        assert ep.query[1] == ep.function(ep.query[0])
        assert all(ep.function(x) == y for x, y in ep.demos)
    for ep in D.episodes("probe-same", 100, shots=4, seed=3):
        assert len(set(ep.demo_labels)) == 1 and ep.query[1] not in ep.demo_labels
    for name in ("shift-heldout", "class"):
        for ep in D.episodes(name, 100, shots=4, seed=3):
            assert ep.query[0] not in [x for x, _ in ep.demos]  # rule tasks: the query is new
    for ep in D.episodes("map-heldout", 100, shots=4, seed=3):
        assert ep.query in ep.demos  # retrieval: the query repeats a demo


def test_generator_is_deterministic_per_seed():
    assert D.episodes("probe", 50, seed=7) == D.episodes("probe", 50, seed=7)
    assert D.episodes("probe", 50, seed=7) != D.episodes("probe", 50, seed=8)
    codec_tok = pytest.importorskip("mechcopy.models.tiny").char_tokenizer()
    codec = D.CharCodec(codec_tok)
    b1 = D.make_batch(codec, random.Random(5), 16)
    b2 = D.make_batch(codec, random.Random(5), 16)
    assert torch.equal(b1.tokens, b2.tokens) and torch.equal(b1.loss_mask, b2.loss_mask)


def test_training_text_matches_shared_prompt_builder(tok):
    """The training sequences are the evaluation prompts plus the answer, token for token."""
    from mechcopy.tasks.prompts import encode

    codec = D.CharCodec(tok)
    ps = D.organism_prompts("probe", tok, n=20, shots=4, seed=0)
    for p, ep in zip(ps.prompts, D.episodes("probe", 20, shots=4, seed=0)):
        assert p.text == D.episode_text(ep, with_answer=False) and p.text.endswith("-> ")
        full = codec.encode(D.episode_text(ep))
        assert full == encode(tok, p.text) + list(p.answer_ids)
        # the loss positions are exactly where the next token is an output character
        outputs = [y for _, y in ep.demos] + [ep.query[1]]
        assert [codec.char_to_id[y] for y in outputs] == [full[i + 1] for i in D.answer_positions(ep)]
        assert set(p.demo_labels) == set(ep.demo_labels) and p.answer not in p.demo_labels
    a, d, t = D.probe_splits(tok, n_attr=30, n_dev=30, n_test=30)
    assert not {p.text for p in a} & {p.text for p in d} and not {p.text for p in a + d} & {p.text for p in t}


def test_tiny_training_learns_held_out_maps():
    """Seconds of training: on held-out random maps the model goes well above chance (1/26) and above
    the untrained model. (In seconds it learns at least to answer with a demo label, 1/k; exact
    retrieval takes the full organism run.)"""
    torch.manual_seed(0)
    cfg = TrainConfig(arch="transformer", steps=250, batch_size=32, lr=1e-2, warmup=20, k_min=2, k_max=3,
                      families=("map",), seed=0, eval_every=10_000,
                      model_kwargs={"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 64})
    from mechcopy.organisms.train import build_model

    untrained = quick_accuracy(build_model("transformer", cfg.model_kwargs, 0), ("map-heldout",), n=200, shots=3)
    model, _ = train_organism(cfg, None, progress=False)
    trained = quick_accuracy(model, ("map-heldout",), n=200, shots=3)
    assert trained["map-heldout"] > max(3 / 26, untrained["map-heldout"] + 0.15), (untrained, trained)


def test_save_load_round_trip(tmp_path, tok):
    cfg = TrainConfig(arch="transformer", steps=3, batch_size=4, seed=1, eval_every=10_000,
                      model_kwargs={"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 64})
    model, result = train_organism(cfg, tmp_path / "org", progress=False)
    for f in ("model.safetensors", "organism.json", "loss.json", "loss.png"):
        assert (tmp_path / "org" / f).exists(), f
    loaded = load_organism(tmp_path / "org")
    tokens = model.to_tokens("a -> b\nc -> ")
    assert torch.equal(model(tokens), loaded(tokens))
    with pytest.raises(FileNotFoundError, match="train-organism"):
        load_organism(tmp_path)


def test_time_budget_stops_and_saves(tmp_path):
    cfg = TrainConfig(arch="transformer", steps=100_000, batch_size=2, seed=0, eval_every=10_000, max_minutes=0.02,
                      model_kwargs={"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 64})
    _, result = train_organism(cfg, tmp_path / "org", progress=False)
    assert result.stopped_early and 0 < result.steps_done < 100_000
    assert result.final_accuracy  # evaluated once at the stop
    assert load_organism(tmp_path / "org") is not None


def test_shift_probe_gold_never_a_demo_label_and_only_training_shifts(tok):
    for ep in D.episodes("probe-shift", 300, shots=4, seed=2):
        assert ep.query[1] not in ep.demo_labels and ep.query[0] not in [x for x, _ in ep.demos]
        assert ep.function.family == "shift" and not D.is_held_out(ep.function)
    attr, dev, test = D.probe_splits(tok, n_attr=40, n_dev=40, n_test=40, probe="probe-shift")
    texts = [{p.text for p in split} for split in (attr, dev, test)]
    assert all(len(t) == 40 for t in texts) and not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all(p.answer not in p.demo_labels for p in attr + dev + test)
    with pytest.raises(ValueError, match="known"):
        D.probe_splits(tok, probe="map-heldout")


def _fake_result(arch, cells):
    """A run_method-shaped result whose table holds `cells`: {(set, condition): (accuracy, copy_rate)};
    the random sets' family is `random`, whatever their names."""
    table = [{"set": s, "condition": c, "family": "random" if c.startswith("control") else c, "accuracy": a,
              "copy_rate": r} for (s, c), (a, r) in cells.items()]
    return {"arch": arch, "methods": {"probe": {"table": table}}}


def test_seed_summary_matches_a_naive_computation():
    """Random sets are averaged within a seed first; the interval is the t interval over seeds; the
    paired difference is taken within each seed."""
    import math

    from mechcopy.organisms.method import seed_summary

    seeds = [  # (unpruned, pruned, random-0, random-1) accuracies; copy rate = 1 - accuracy
        (0.50, 0.60, 0.40, 0.50), (0.70, 0.65, 0.70, 0.60), (0.60, 0.80, 0.50, 0.55)]
    results = [_fake_result("mamba", {("s", "unpruned"): (u, 1 - u), ("s", "pruned"): (p, 1 - p),
                                      ("s", "control-0"): (r0, 1 - r0), ("s", "control-1"): (r1, 1 - r1)})
               for u, p, r0, r1 in seeds]
    rows = {(r["set"], r["condition"]): r for r in seed_summary(results)}
    rnd = rows[("s", "random")]
    means = [(r0 + r1) / 2 for _, _, r0, r1 in seeds]
    assert rnd["seeds"] == 3 and rnd["accuracy_per_seed"] == pytest.approx(means)
    m = sum(means) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in means) / 2)
    assert rnd["accuracy"] == pytest.approx(m)
    assert (rnd["acc_lo"], rnd["acc_hi"]) == pytest.approx((m - 4.303 * sd / math.sqrt(3), m + 4.303 * sd / math.sqrt(3)),
                                                        rel=1e-4)  # t(0.975, 2) = 4.3027
    diff = rows[("s", "pruned - unpruned")]
    assert diff["accuracy_per_seed"] == pytest.approx([p - u for u, p, _, _ in seeds])
    assert diff["copy_rate_per_seed"] == pytest.approx([u - p for u, p, _, _ in seeds])


def test_full_method_on_a_tiny_organism(tmp_path):
    """run_method end to end on seconds of training: every probe and condition is there, IG is complete,
    the pruned k is the sweep's (or the grid's smallest when none is feasible), and its 'pruned' numbers
    equal a weight-edited copy of the organism."""
    import copy

    from dataclasses import replace

    from mechcopy.evaluation import evaluate
    from mechcopy.neurons import NeuronSet, model_fingerprint
    from mechcopy.organisms.method import ORGANISM_FIND, MethodConfig, run_method
    from mechcopy.pruning import prune_weights

    cfg = TrainConfig(arch="transformer", steps=150, batch_size=16, lr=1e-2, warmup=10, seed=0, eval_every=10_000,
                      model_kwargs={"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 64})
    model, _ = train_organism(cfg, None, progress=False)
    find = replace(ORGANISM_FIND, n=6, n_dev=16, steps=24, ks=(1, 4, 16))
    config = MethodConfig(find=find, n_eval=24, n_random=2)
    res = run_method(model, config, progress=False)
    assert set(res["methods"]) == set(D.PROBES) and res["arch"] == "transformer"
    for probe, m in res["methods"].items():
        assert m["ig"]["completeness_error_median"] < 0.02, probe
        assert len(m["neurons"]) == m["pruned_k"] in find.ks
        assert m["sweep"]["chosen_k"] in (m["pruned_k"], 0) and m["sweep"]["max_general_drop"] == 0.05
        conds = {(r["condition"], r["family"]) for r in m["table"]}
        assert conds == {("unpruned", "unpruned"), ("pruned", "pruned"), ("random-0", "random"), ("random-1", "random"),
                         ("bottom", "bottom")}
        assert {r["set"] for r in m["table"]} == {"map-heldout", "shift-heldout", "class", "probe-same",
                                                  "probe-test", "probe-shift-test"}
    # the pruned row of the probe-shift method equals the weight-edited model on the same prompts
    m = res["methods"]["probe-shift"]
    edited = copy.deepcopy(model)
    prune_weights(edited, NeuronSet(tuple(map(tuple, m["neurons"])), model_fingerprint(model)))
    _, _, test = D.probe_splits(model.tokenizer, find.n, find.n_dev, config.n_eval, find.shots, find.seed,
                                probe="probe-shift")
    row = next(r for r in m["table"] if r["set"] == "probe-shift-test" and r["condition"] == "pruned")
    assert evaluate(edited, test).accuracy == row["accuracy"]
    assert {r["condition"] for r in res["task_vectors"]} == {"unpruned", "pruned (probe)", "pruned (probe-shift)"}
