"""Annotations are checked at test time: jaxtyping's pytest hook (pyproject's addopts) wraps every
mechcopy function and dataclass with beartype, so a tensor of the wrong shape, or two arguments that
disagree on a named dimension, fail the test that passed them. These tests fail if the checks are off."""

import pytest
import torch
from jaxtyping import TypeCheckError

from mechcopy.attribution import Attributions
from mechcopy.batching import left_pad
from mechcopy.stability import scores_of


def test_a_wrong_rank_is_refused():
    """`scores_of` takes [prompts, layers, neurons]: a [layers, neurons] map is a shape violation."""
    assert scores_of(torch.rand(2, 3, 4), "none").shape == (3, 4)
    with pytest.raises(TypeCheckError, match="prompts layers neurons"):
        scores_of(torch.rand(3, 4), "none")


def test_dimensions_must_agree_across_fields():
    """`Attributions` names the prompts dimension in three fields: 2 prompts of values with 5 clean
    targets is refused when the result is built, not later where the numbers would be wrong."""
    def make(n_targets: int) -> Attributions:
        return Attributions(torch.zeros(2, 3, 4), torch.zeros(n_targets), torch.zeros(2, 3), "contrast", "ig", "fast",
                            4, "gauss-legendre")

    assert make(2).values.shape == (2, 3, 4)
    with pytest.raises(TypeCheckError, match="prompts"):
        make(5)


def test_a_wrong_type_in_a_sequence_is_refused():
    """Not only shapes: `left_pad` takes 1-D token rows; a list of texts fails its annotation."""
    tokens, mask = left_pad([torch.tensor([1, 2]), torch.tensor([3])], pad_id=0)
    assert tokens.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(TypeCheckError):
        left_pad(["ab", "c"])
