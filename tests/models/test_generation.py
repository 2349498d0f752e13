"""Beam search over a next-token function (XVLM's captioner): by hand, and its repetition penalty."""
import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from mflightning.models.generation import beam_search, penalise_repetitions


def table_step(table, eos):
    """Next-token logits from a table prefix -> {token: probability}; unlisted prefixes end (eos)."""

    def step(seqs):
        out = torch.full((seqs.size(0), 4), -1e9)
        for row, seq in enumerate(seqs.tolist()):
            for token, p in table.get(tuple(seq[1:]), {eos: 1.0}).items():
                out[row, token] = math.log(p)
        return out

    return step


def test_beam_search_by_hand():
    """Beams keep a second-best start that greedy decoding drops; min/max length count the prompt."""
    eos, prompt = 3, torch.zeros(1, 1, dtype=torch.long)
    step = table_step({(): {1: 0.6, 2: 0.4}, (1,): {1: 0.25, 2: 0.4, eos: 0.35}, (2,): {1: 0.95, eos: 0.05}}, eos)
    # [2, 1, eos]: log(.38)/3 beats [1, 2, eos]: log(.24)/3; [1, eos] (.21) ranks 3rd of 4 at its step.
    assert beam_search(step, prompt, num_beams=2, min_length=1, max_length=6, eos_token_id=eos) == [[2, 1]]
    assert beam_search(step, prompt, num_beams=1, min_length=1, max_length=6, eos_token_id=eos) == [[1, 2]]
    # max_length 3 = prompt + 2 tokens: the running beams compete without eos.
    assert beam_search(step, prompt, 2, 1, 3, eos) == [[2, 1]]
    two = torch.zeros(2, 1, dtype=torch.long)
    step = table_step({(): {1: 1.0}, (1,): {eos: 0.6, 2: 0.4}}, eos)
    assert beam_search(step, two, 1, 1, 6, eos) == [[1], [1]]
    assert beam_search(step, two, 2, 3, 6, eos) == [[1, 2], [1, 2]]  # eos blocked while length < 3


def test_repetition_penalty_matches_transformers_and_steers_the_search():
    torch.manual_seed(0)
    logp = torch.randn(3, 7).log_softmax(-1)
    seqs = torch.tensor([[0, 2, 2], [1, 3, 5], [6, 6, 6]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seqs, logp.clone())
    assert torch.allclose(penalise_repetitions(logp, seqs, 1.3), expected)
    # Greedy: token 1 repeats (0.6 each step) unless repeating costs enough; eos ends the caption.
    eos, prompt = 3, torch.zeros(1, 1, dtype=torch.long)
    step = table_step({(): {1: 0.6, 2: 0.4}, (1,): {1: 0.6, 2: 0.4}, (1, 1): {eos: 1.0}, (1, 2): {eos: 1.0}}, eos)
    assert beam_search(step, prompt, 1, 1, 6, eos) == [[1, 1]]
    assert beam_search(step, prompt, 1, 1, 6, eos, repetition_penalty=2.0) == [[1, 2]]
    with pytest.raises(ValueError, match="repetition_penalty must be positive"):
        beam_search(step, prompt, 1, 1, 6, eos, repetition_penalty=0.0)


def test_length_normalisation_as_transformers_5_or_4_31():
    """Prompt of 3 tokens. A = [1] eos, log-probability log(.5 * .5) = -1.386; B = [2, 1, 1] eos, log(.5 * .9 * .9
    * .25) = -2.290. By generated tokens with eos (transformers 5): A -1.386 / 2 = -0.693 < B -2.290 / 4 = -0.573,
    B wins; by prompt + generated tokens without eos (4.31): A -1.386 / 4 = -0.347 > B -2.290 / 6 = -0.382, A wins.
    Every other continuation is uniform over {1, 2, eos} and scores lower under both."""
    eos, prompt = 3, torch.zeros(1, 3, dtype=torch.long)
    uniform = {1: 1 / 3, 2: 1 / 3, eos: 1 / 3}
    table = {(): {1: 0.5, 2: 0.5}, (1,): {eos: 0.5, 2: 0.5}, (2,): {1: 0.9, eos: 0.1}, (2, 1): {1: 0.9, eos: 0.1},
             (2, 1, 1): {eos: 0.25, 1: 0.375, 2: 0.375}}

    def step(seqs):
        out = torch.full((seqs.size(0), 4), -1e9)
        for row, seq in enumerate(seqs.tolist()):
            for token, p in table.get(tuple(seq[3:]), uniform).items():
                out[row, token] = math.log(p)
        return out

    assert beam_search(step, prompt, 3, 1, 10, eos) == [[2, 1, 1]]
    assert beam_search(step, prompt, 3, 1, 10, eos, length_normalisation="generated") == [[2, 1, 1]]
    assert beam_search(step, prompt, 3, 1, 10, eos, length_normalisation="sequence") == [[1]]
    with pytest.raises(ValueError, match="length_normalisation"):
        beam_search(step, prompt, 3, 1, 10, eos, length_normalisation="tokens")
