"""Per-head activation patching equals transformer_lens.patching's head functions (z, q, k, v; all
positions and by position), on grouped-query models too (k and v against TransformerLens on the same
weights ungrouped); pairs of different lengths are kept and aligned by role; a small or wrong-signed
clean-corrupted gap is flagged."""

import pytest
import torch
from transformer_lens import patching as tlp

from mechcopy import head_patching as HP
from mechcopy import patching as P
from mechcopy.models.tiny import tiny_transformer
from mechcopy.tasks import Task
from mechcopy.tasks.pairs import align_roles

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "lamp", "rock", "milk", "rain", "door",
         "leaf", "frog", "ship", "corn", "wolf", "hand", "ring", "salt", "wind", "star", "moon", "pear"]
FIRSTLEN = Task("firstlen", tuple((w, str((ord(w[0]) - 96) % 10)) for w in WORDS))
#: inputs and labels of different token lengths (a country -> currency file, in miniature)
RAGGED = Task("ragged", tuple((w * (1 + i % 3), ["eu", "yen", "usd", "krona"][i % 4]) for i, w in enumerate(WORDS)))

TL = {"z": (tlp.get_act_patch_attn_head_out_all_pos, tlp.get_act_patch_attn_head_out_by_pos),
      "q": (tlp.get_act_patch_attn_head_q_all_pos, tlp.get_act_patch_attn_head_q_by_pos),
      "k": (tlp.get_act_patch_attn_head_k_all_pos, tlp.get_act_patch_attn_head_k_by_pos),
      "v": (tlp.get_act_patch_attn_head_v_all_pos, tlp.get_act_patch_attn_head_v_by_pos)}


def _setup(model, shots=3):
    pairs = P.make_pairs(model, FIRSTLEN, "shuffled_labels", n=3, shots=shots, seed=0)
    metric = P.NormalisedLogitDiff.from_runs(model, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold, pairs.ref)
    return pairs, metric


@pytest.mark.parametrize("activation", list(TL))
def test_equals_transformer_lens(tiny, activation):
    pairs, metric = _setup(tiny)
    _, cache = tiny.run_with_cache(pairs.clean_tokens)
    all_pos, by_pos = TL[activation]
    ours = HP.patch_heads(tiny, pairs.clean_tokens, pairs.corrupt_tokens, metric, activation)
    torch.testing.assert_close(ours, all_pos(tiny, pairs.corrupt_tokens, cache, metric), atol=1e-5, rtol=1e-5)
    ours = HP.patch_heads(tiny, pairs.clean_tokens, pairs.corrupt_tokens, metric, activation, by_position=True)
    torch.testing.assert_close(ours, by_pos(tiny, pairs.corrupt_tokens, cache, metric), atol=1e-5, rtol=1e-5)
    assert ours.abs().max() > 1e-2


def test_grouped_query_heads(one_thread):
    """z and q are per query head: TransformerLens works and agrees. k and v are per key/value head: its
    functions patch whole groups (one value per key/value head; its issue #980 reports crashes); ours, per query head, equal TransformerLens on the
    same weights with the heads ungrouped."""
    model = tiny_transformer(n_layers=2, seed=0, n_key_value_heads=2)
    pairs, metric = _setup(model, shots=2)
    _, cache = model.run_with_cache(pairs.clean_tokens)
    for activation in ("z", "q"):
        for by_position, theirs in zip((False, True), TL[activation]):
            ours = HP.patch_heads(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, activation, by_position)
            torch.testing.assert_close(ours, theirs(model, pairs.corrupt_tokens, cache, metric), atol=1e-5, rtol=1e-5)
    # TransformerLens 3.9 patches whole key/value groups: one value per key/value head, not per query head
    assert TL["k"][0](model, pairs.corrupt_tokens, cache, metric).shape == (2, 2)
    assert TL["v"][1](model, pairs.corrupt_tokens, cache, metric).shape == (2, pairs.corrupt_tokens.shape[1], 2)
    ours = {(a, b): HP.patch_heads(model, pairs.clean_tokens, pairs.corrupt_tokens, metric, a, b)
            for a in "kv" for b in (False, True)}
    before = model(pairs.corrupt_tokens)
    model.cfg.ungroup_grouped_query_attention = True
    try:
        torch.testing.assert_close(model(pairs.corrupt_tokens), before)       # same model, heads ungrouped
        _, cache = model.run_with_cache(pairs.clean_tokens)
        assert cache["blocks.0.attn.hook_k"].shape[2] == 4
        n_pos = pairs.corrupt_tokens.shape[1]
        for a in "kv":
            for by_position, (setter, axes) in ((False, (tlp.layer_head_vector_patch_setter, [2, 4])),
                                                (True, (tlp.layer_pos_head_vector_patch_setter, [2, n_pos, 4]))):
                names = ["layer", "pos", "head"] if by_position else ["layer", "head"]
                index = tlp.make_df_from_ranges(axes, names)      # n_heads entries, as the ungrouped model has
                theirs = tlp.generic_activation_patch(model, pairs.corrupt_tokens, cache, metric, setter, a,
                                                      index_df=index).reshape(axes)
                torch.testing.assert_close(ours[a, by_position], theirs, atol=1e-5, rtol=1e-5)
            assert ours[a, False].abs().max() > 1e-2
            # heads of one group differ: each query head's own view of the group's keys/values was patched
            assert (ours[a, False][:, 0] - ours[a, False][:, 1]).abs().max() > 1e-4
    finally:
        model.cfg.ungroup_grouped_query_attention = False


def test_align_roles_by_hand():
    target = ["BOS", "x1", "x1", "->1", "y1", "\\n1", "xq", "->q"]
    source = ["BOS", "x1", "->1", "y1", "y1", "y1", "\\n1", "xq", "xq", "->q"]
    t, s = align_roles(target, source)
    assert list(zip(t, s)) == [(0, 0), (2, 1), (3, 2), (4, 5), (5, 6), (6, 8), (7, 9)]
    assert align_roles(target, source, ["y1"]) == ([4], [5])


def test_role_pairs_keep_different_lengths(tiny):
    old = P.make_pairs(tiny, RAGGED, "shuffled_labels", n=8, shots=3, seed=0)
    new = P.role_pairs(tiny, RAGGED, "shuffled_labels", n=8, shots=3, seed=0)
    lengths = {(p.clean_tokens.shape[1], p.corrupt_tokens.shape[1]) for p in new}
    assert len(new) > len(old) and len(new) >= 6
    assert len({a for a, _ in lengths}) > 1                  # pairs of different lengths, kept
    assert any(not p.same_layout for p in new)                # labels of different lengths moved within a pair
    for p in new:
        t, s = p.aligned()
        assert t[-1] == p.corrupt_tokens.shape[1] - 1 and s[-1] == p.clean_tokens.shape[1] - 1   # the final position
        assert [p.corrupt_roles[i] for i in t] == [p.clean_roles[i] for i in s]
    assert new.roles()[0] == "BOS" and new.roles()[-1] == "->q"


def test_head_patching_on_one_layout_equals_patch_heads(tiny):
    """On pairs of one layout, the per-pair loop gives what the stacked batch gives with the LD metric."""
    pairs, metric = _setup(tiny)
    rp = P.role_pairs(tiny, FIRSTLEN, "shuffled_labels", n=12, shots=3, seed=0)
    same = P.RolePairs(tuple(p for p in rp if p.same_layout and p.clean_roles == pairs.roles)[:3])
    stacked = P.PatchPairs(tuple(p.clean for p in same), tuple(p.corrupt for p in same),
                           torch.cat([p.clean_tokens for p in same]), torch.cat([p.corrupt_tokens for p in same]),
                           torch.tensor([p.gold for p in same]), torch.tensor([p.ref for p in same]), pairs.roles)
    metric = P.NormalisedLogitDiff.from_runs(tiny, stacked.clean_tokens, stacked.corrupt_tokens, stacked.gold, stacked.ref)
    ours = HP.head_patching(tiny, same)
    torch.testing.assert_close(ours.array()[:, 0], HP.patch_heads(tiny, stacked.clean_tokens, stacked.corrupt_tokens, metric),
                               atol=1e-5, rtol=1e-5)
    # one role at a time: a role's tokens patched together, by hand for one role and head
    by_role = HP.head_patching(tiny, same, by_role=True, roles=["y2", "->q"])
    assert by_role.columns == ("y2", "->q") and by_role.array().shape == (2, 2, 4)
    pos = [i for i, r in enumerate(pairs.roles) if r == "y2"]
    groups = [(1, pos, None)]
    logits = HP._run_groups(tiny, 1, "z", tiny.run_with_cache(stacked.clean_tokens)[1],
                            tiny.run_with_cache(stacked.corrupt_tokens)[1]["blocks.1.hook_resid_pre"], groups)
    assert abs(float(metric(logits[0])) - float(by_role.array()[1, 0, 1])) < 1e-5
    back = HP.HeadPatchingResult.from_json(by_role.to_json())
    assert back == by_role


def test_head_patching_on_ragged_pairs_and_its_warning(tiny):
    res = HP.task_head_patching(tiny, RAGGED, "shuffled_labels", n=8, shots=3, seed=0)
    assert res.array().shape == (2, 1, 4) and res.n_pairs >= 6 and torch.isfinite(res.array()).all()
    assert res.warning == P.gap_warning(res.ld_clean, res.ld_corrupt)


def test_gap_warning():
    assert P.gap_warning([2.0, 2.1, 1.9], [0.0, 0.1, -0.1]) is None
    assert "-0.280 (<= 0)" in P.gap_warning([0.0, 0.1], [0.28, 0.38])
    assert "within 2 standard errors" in P.gap_warning([1.0, -0.8, 0.9, -0.7], [0.0, 0.0, 0.0, 0.0])
    assert "one pair" in P.gap_warning([1.0], [0.0])


def test_activation_patching_carries_the_warning(tiny):
    r = P.activation_patching(tiny, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0)
    pairs = P.make_pairs(tiny, FIRSTLEN, "shuffled_labels", n=3, shots=3, seed=0)
    metric = P.NormalisedLogitDiff.from_runs(tiny, pairs.clean_tokens, pairs.corrupt_tokens, pairs.gold, pairs.ref)
    assert len(metric.pairs_clean) == len(pairs)
    assert abs(sum(metric.pairs_clean) / len(pairs) - metric.ld_clean) < 1e-5
    assert r.warning == metric.warning and r.to_json()["warning"] == r.warning


def test_role_pairs_from_prompts_reversed(tiny):
    """No gold among the demos; the corrupted prompt shows the gold once and is the source of the patches."""
    from mechcopy.tasks.prompts import build_prompts

    prompts = build_prompts(FIRSTLEN, tiny.tokenizer, shots=3, n=6, seed=1, gold_in_demos=False).prompts
    pairs = P.role_pairs_of(tiny, prompts, "gold_label", reverse=True)
    assert len(pairs) + len(pairs.dropped) == len(prompts) and len(pairs) >= 4
    for pair, p in zip(pairs, [q for q in prompts if any(q.query == r.corrupt.query for r in pairs)]):
        assert pair.corrupt == p and p.answer not in p.demo_labels              # patched into: no gold
        assert pair.clean.demo_labels.count(p.answer) == 1                       # the source shows it once
        assert pair.ref in {ids[0] for ids in p.demo_label_ids} and pair.ref != pair.gold
    same = P.role_pairs(tiny, FIRSTLEN, "gold_label", n=4, shots=3, seed=1, gold_in_demos=False, reverse=True)
    assert all(pair.clean.answer in pair.clean.demo_labels for pair in same)
    assert all(pair.corrupt.answer not in pair.corrupt.demo_labels for pair in same)


def test_role_pairs_of_given_corrupted_prompts(tiny):
    from mechcopy.tasks.prompts import build_prompts, make_prompt

    prompts = build_prompts(FIRSTLEN, tiny.tokenizer, shots=3, n=3, seed=2, gold_in_demos=False).prompts
    swapped = [make_prompt([(x, p.answer) for x, _ in p.demos], (p.query, p.answer), tiny.tokenizer) for p in prompts]
    pairs = P.role_pairs_of(tiny, prompts, swapped, reverse=True)       # patched from "every demo shows gold"
    assert [p.clean for p in pairs] == swapped and [p.corrupt for p in pairs] == list(prompts)
    with pytest.raises(ValueError, match="every demo label starts with the gold token"):
        P.role_pairs_of(tiny, prompts, swapped)                          # patched into it: no reference token
    with pytest.raises(ValueError, match="one corrupted prompt per prompt"):
        P.role_pairs_of(tiny, prompts, swapped[:2])
