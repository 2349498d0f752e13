"""Beam search over a next-token function: XVLM's captioner has no transformers ``generate``.

Lives with the models because a backbone's ``generate_caption`` (``VisionLanguageBackbone``) runs it.
"""
from __future__ import annotations

from typing import Callable

import torch


def penalise_repetitions(logp: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of the tokens already in each row of ``seqs``: negative ones times ``penalty``, positive ones
    divided by it (transformers' repetition penalty)."""
    seen = logp.gather(1, seqs)
    return logp.scatter(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))


@torch.no_grad()
def beam_search(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, num_beams: int,
                min_length: int, max_length: int, eos_token_id: int, length_penalty: float = 1.0,
                repetition_penalty: float = 1.0) -> list[list[int]]:
    """Beam search continuing ``prompt`` ``(B, P)``; returns each item's generated ids (eos dropped).

    ``step(seqs)`` gives next-token logits ``(B*K, V)`` for ``seqs`` ``(B*K, t)`` (row ``b*K + j`` is
    beam j of item b). Lengths count the prompt; eos is blocked below ``min_length``. Finished
    hypotheses are scored by summed log-probability / (generated tokens incl. eos) ** length_penalty;
    an item stops when it has K finished hypotheses that no running beam can beat (as in HF).
    ``repetition_penalty`` > 1 makes tokens already in a beam (prompt included) less likely, as
    transformers' ``RepetitionPenaltyLogitsProcessor`` does to beam-search log-probabilities.
    """
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
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
                        finished[b] = sorted(finished[b] + [(score / generated ** length_penalty, hyp)],
                                             reverse=True)[:k]
                else:
                    running.append((score, b * k + beam, token))
            while len(running) < k:  # finished items (or too few candidates) keep placeholder beams
                running.append((float("-inf"), b * k, eos_token_id))
            best_running = running[0][0]
            if len(finished[b]) == k and finished[b][-1][0] >= best_running / generated ** length_penalty:
                done[b] = True
            for score, row, token in running:
                rows.append(row)
                tokens.append(token)
                new_scores.append(score)
        index = torch.tensor(rows, device=seqs.device)
        seqs = torch.cat([seqs[index], torch.tensor(tokens, device=seqs.device).view(-1, 1)], dim=1)
        scores = torch.tensor(new_scores, device=seqs.device).view(batch, k)
    generated = seqs.size(1) - prompt_len
    out = []
    for b in range(batch):
        pool = list(finished[b])
        if not done[b]:  # max_length reached: running beams compete as they are
            pool += [(s / max(1, generated) ** length_penalty, seqs[b * k + j, prompt_len:].tolist())
                     for j, s in enumerate(scores[b].tolist()) if s > float("-inf")]
        out.append(max(pool, key=lambda item: item[0])[1] if pool else [])
    return out


__all__ = ["beam_search", "penalise_repetitions"]
