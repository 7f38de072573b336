"""`mechcopy find` and `mechcopy evaluate` through the command line on a bfloat16 model."""

import json

import pytest
import torch

from mechcopy.attribution import Attributions
from mechcopy.find import side_file
from mechcopy.neurons import NeuronSet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_find_and_evaluate_in_bfloat16(tmp_path, monkeypatch, best_k_chosen):
    import mechcopy
    from mechcopy.commands import main
    from mechcopy.models.tiny import tiny_transformer

    received = []

    def load_model(name, device=None, dtype=None):
        received.append((name, device, dtype))
        return tiny_transformer(n_layers=2, d_model=32, d_mlp=64, seed=0, device=device, dtype=dtype)

    monkeypatch.setattr(mechcopy.models, "load_model", load_model)
    opening = ["--model", "tiny", "--device", "cpu", "--dtype", "bfloat16", "--threads", "1"]
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    neurons = tmp_path / "neurons.json"
    assert main(["find", *opening, "--n", "4", "--n-dev", "4", "--steps", "4", "--batch-size", "2", "--ks", "1,2",
                 "--ppl-tokens", "64", "--max-ppl-increase", "10", "--text", str(text), "--out", str(neurons)]) == 0
    att, _ = Attributions.load(side_file(neurons, ".attributions.safetensors"))
    assert att.values.dtype == torch.float32 and att.values.shape == (4, 2, 64)
    assert torch.isfinite(att.values).all() and att.values.abs().max() > 0
    assert len(NeuronSet.load(neurons)) in (1, 2)

    task = tmp_path / "upper.json"
    task.write_text(json.dumps({"name": "upper", "pairs": [[w, w.upper()] for w in ("ab", "cd", "ef", "gh", "ij", "kl")]}))
    out = tmp_path / "evaluate.json"
    assert main(["evaluate", *opening, "--tasks", str(task), "--shots", "2", "--n", "4", "--prune", str(neurons),
                 "--n-random", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["condition"] for r in rows] == ["unpruned", "pruned", "random-0", "bottom"]
    assert all(len(r["predictions"]) == 4 and all(isinstance(p, str) for p in r["predictions"]) for r in rows)
    assert received == [("tiny", "cpu", torch.bfloat16)] * 2
