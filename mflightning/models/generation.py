"""Beam search over a next-token function: XVLM's captioner has no transformers ``generate``.

Lives with the models because a backbone's ``generate_caption`` (``VisionLanguageBackbone``) runs it.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch


def penalise_repetitions(logp: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of the tokens already in each row of ``seqs``: negative ones times ``penalty``, positive ones
    divided by it (transformers' repetition penalty)."""
    seen = logp.gather(1, seqs)
    return logp.scatter(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))


#: How a hypothesis's summed log-probability is normalised: by its generated tokens, end token included
#: (transformers 5); or by the whole sequence, prompt included, end token excluded (transformers 4.31,
#: which the MultiFlow authors ran: ``BeamHypotheses.add`` divides by ``hyp.shape[-1]``).
LengthNormalisation = Literal["generated", "sequence"]
LENGTH_NORMALISATIONS = ("generated", "sequence")


@torch.no_grad()
def beam_search(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, num_beams: int,
                min_length: int, max_length: int, eos_token_id: int, length_penalty: float = 1.0,
                repetition_penalty: float = 1.0, length_normalisation: LengthNormalisation = "generated",
                ) -> list[list[int]]:
    """Beam search continuing ``prompt`` ``(B, P)``; returns each item's generated ids (eos dropped).

    ``step(seqs)`` gives next-token logits ``(B*K, V)`` for ``seqs`` ``(B*K, t)`` (row ``b*K + j`` is
    beam j of item b). Lengths count the prompt; eos is blocked below ``min_length``. Finished
    hypotheses are scored by summed log-probability / (generated tokens incl. eos) ** length_penalty;
    an item stops when it has K finished hypotheses that no running beam can beat (as in HF).
    ``length_normalisation="sequence"`` scores as transformers 4.31 does instead: a finished hypothesis
    by its length without eos, prompt included; an item stops when its worst finished score is at least
    the best candidate's sum over the length it would have (``BeamHypotheses.is_done``); at
    ``max_length`` the running beams are scored by their full length.
    ``repetition_penalty`` > 1 makes tokens already in a beam (prompt included) less likely, as
    transformers' ``RepetitionPenaltyLogitsProcessor`` does to beam-search log-probabilities.
    """
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    if length_normalisation not in LENGTH_NORMALISATIONS:
        raise ValueError(f"length_normalisation must be one of {LENGTH_NORMALISATIONS}, got {length_normalisation!r}")
    by_sequence = length_normalisation == "sequence"
    batch, prompt_len = prompt.shape
    k = num_beams
    seqs = prompt.repeat_interleave(k, dim=0)
    scores = torch.full((batch, k), float("-inf"), device=prompt.device)
    scores[:, 0] = 0.0  # identical beams at the start: let only the first one expand
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    while seqs.size(1) < max_length and not all(done):
        logp = step(seqs).float().log_softmax(dim=-1)
        if repetition_penalty != 1.0:
            logp = penalise_repetitions(logp, seqs, repetition_penalty)
        if seqs.size(1) < min_length:
            logp[:, eos_token_id] = float("-inf")
        vocab = logp.size(-1)
        top_scores, top_ids = (scores.view(-1, 1) + logp).view(batch, k * vocab).topk(2 * k, dim=1)
        generated = seqs.size(1) + 1 - prompt_len
        finished_length = seqs.size(1) if by_sequence else generated  # a hypothesis ending here, normalised
        rows, tokens, new_scores = [], [], []
        for b in range(batch):
            running = []
            for rank_, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                beam, token = divmod(flat, vocab)
                if done[b] or len(running) == k:
                    break
                if token == eos_token_id:
                    if rank_ < k and score > float("-inf"):
                        hyp = seqs[b * k + beam, prompt_len:].tolist()
                        finished[b] = sorted(finished[b] + [(score / finished_length ** length_penalty, hyp)],
                                             reverse=True)[:k]
                else:
                    running.append((score, b * k + beam, token))
            while len(running) < k:  # finished items (or too few candidates) keep placeholder beams
                running.append((float("-inf"), b * k, eos_token_id))
            if by_sequence:  # 4.31: the best of all candidates (eos ones too) over the length with the new token
                best = top_scores[b, 0].item() / (seqs.size(1) + 1) ** length_penalty
            else:
                best = running[0][0] / generated ** length_penalty
            if len(finished[b]) == k and finished[b][-1][0] >= best:
                done[b] = True
            for score, row, token in running:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        index = torch.tensor(rows, device=seqs.device)
        seqs = torch.cat([seqs[index], torch.tensor(tokens, device=seqs.device).view(-1, 1)], dim=1)
        scores = torch.tensor(new_scores, device=seqs.device).view(batch, k)
    final_length = seqs.size(1) if by_sequence else max(1, seqs.size(1) - prompt_len)
    out = []
    for b in range(batch):
        pool = list(finished[b])
        if not done[b]:  # max_length reached: running beams compete as they are
            pool += [(s / final_length ** length_penalty, seqs[b * k + j, prompt_len:].tolist())
                     for j, s in enumerate(scores[b].tolist()) if s > float("-inf")]
        out.append(max(pool, key=lambda item: item[0])[1] if pool else [])
    return out


__all__ = ["LENGTH_NORMALISATIONS", "LengthNormalisation", "beam_search", "penalise_repetitions"]
