"""Beam search with Hugging Face's semantics (`generate(num_beams=k, do_sample=False)`).

Each step keeps the 2k best continuations of the k running beams by summed log-probability. A
continuation that ends (end-of-text, a stop sequence, or the last allowed token) among the top k
becomes a finished hypothesis scored `sum_logprobs / generated_len ** length_penalty`, the length
counting the end-of-text token; the k best non-finished continuations run on. A prompt is done when
it holds k hypotheses and its best running beam, scored at its current length, cannot beat the worst
of them (HF's `early_stopping=False` heuristic).
"""

from __future__ import annotations

import torch

from gptlab.infer.engine import InferenceEngine
from gptlab.infer.rows import Completion, TextTokenizer
from gptlab.infer.sampling import SamplingParams, process_logits

_NEG = -1.0e9  # HF's score for impossible beams


def beam_search(
    engine: InferenceEngine,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    tokenizer: TextTokenizer | None,
) -> list[Completion]:
    """The `params.n` best beams of each prompt, best first. Beams are sequences of `engine`'s pool:
    a beam that continues another forks its blocks (the prompt is computed and stored once)."""
    B, K, max_new = len(prompts), params.num_beams, params.max_new_tokens
    stops = list(params.stop) if tokenizer is not None else []
    if max_new == 0:
        return [Completion("", [], "length", None, i) for i in range(B) for _ in range(params.n)]
    heads = [engine.sequence(p) for p in prompts]
    logits = engine.forward(heads)
    beams = [engine.fork(heads[b]) for b in range(B) for _ in range(K)]
    for seq in heads:
        engine.free(seq)
    expand = torch.arange(B).repeat_interleave(K)
    logits = logits.index_select(0, expand.to(logits.device))

    running_scores = torch.full((B, K), _NEG)
    running_scores[:, 0] = 0.0  # only the first beam is live at the start, so the k beams differ
    running: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]
    Hypothesis = tuple[float, list[int], str | None, str]  # score, ids, text cut at a stop, reason
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    improvable = [True] * B
    for step in range(max_new):
        gen_len = step + 1
        with torch.inference_mode():
            logp = torch.log_softmax(logits, dim=-1)
            flat_ids = [running[b][k] for b in range(B) for k in range(K)]
            prompt_ids = [prompts[b] for b in range(B) for _ in range(K)]
            logp = process_logits(logp, flat_ids, params, prompt_ids, warp=False).cpu()
            V = logp.shape[-1]
            scores = (logp.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
            top_scores, top_index = torch.topk(scores, 2 * K, dim=-1)  # (B, 2K), best first
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        next_running = []
        source = []  # beam each new running beam continues
        for b in range(B):
            keep: list[tuple[float, int, list[int]]] = []
            ended: list[Hypothesis] = []
            for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b], strict=True)):
                beam, token = divmod(index, V)
                ids = running[b][beam] + [token]
                reason, text = _ending(ids, token, eos_id, stops, tokenizer, gen_len == max_new)
                if reason is None:
                    if len(keep) < K:
                        keep.append((score, beam, ids))
                    continue
                if rank < K and improvable[b]:  # HF: only the top k may finish; none once done
                    ended.append((score / gen_len**params.length_penalty, ids, text, reason))
            # Beams that just ended never run on; fill with dead beams if fewer than K remain.
            while len(keep) < K:
                keep.append((_NEG, 0, running[b][0] + [0]))
            finished[b] = sorted(finished[b] + ended, key=lambda h: -h[0])[:K]
            next_running.append([ids for _, _, ids in keep])
            running_scores[b] = torch.tensor([s for s, _, _ in keep])
            source.extend(b * K + beam for _, beam, _ in keep)
            if len(finished[b]) == K and improvable[b]:
                best_possible = keep[0][0] / gen_len**params.length_penalty
                improvable[b] = best_possible > finished[b][-1][0]
        running = next_running
        if not any(improvable) or step + 1 == max_new:
            break
        tokens = [ids[-1] for group in running for ids in group]
        forked = [engine.fork(beams[i]) for i in source]
        for seq, token in zip(forked, tokens, strict=True):
            seq.tokens.append(token)
        for seq in beams:
            engine.free(seq)
        beams = forked
        logits = engine.forward(beams)
    for seq in beams:
        engine.free(seq)
    return [_beam_completion(b, finished[b][j], eos_id, tokenizer) for b in range(B) for j in range(params.n)]


def _ending(
    ids: list[int],
    token: int,
    eos_id: int | None,
    stops: list[str],
    tokenizer: TextTokenizer | None,
    last: bool,
) -> tuple[str | None, str | None]:
    """(finish reason or None, text cut before a stop sequence or None) of a candidate beam."""
    if token == eos_id:
        return "stop", None
    if stops and tokenizer is not None:
        text = tokenizer.decode(ids)
        cut = [i for s in stops if (i := text.find(s)) >= 0]
        if cut:
            return "stop", text[: min(cut)]
    return ("length" if last else None), None


def _beam_completion(
    prompt_index: int,
    hyp: tuple[float, list[int], str | None, str],
    eos_id: int | None,
    tokenizer: TextTokenizer | None,
) -> Completion:
    _, ids, text, reason = hyp
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    if tokenizer is None:
        return Completion("", ids, reason, None, prompt_index)
    if text is None:
        text = tokenizer.decode(ids)
    else:  # stop sequence: keep the tokens that begin before it
        keep = len(ids)
        while keep and len(tokenizer.decode(ids[: keep - 1])) >= len(text):
            keep -= 1
        ids = ids[:keep]
    return Completion(text, ids, reason, None, prompt_index)
