"""Log-likelihood scoring shared by perplexity, few-shot tasks and the lm-eval adapter.

One question, two ways to answer it: the log-probability of the last n tokens of each sequence given
the tokens before them.
- `score_tokens` runs whole sequences through the model's forward, sorted by length and batched with
  right padding (attention is causal, so padding after a sequence's last token cannot change its
  logits). Only the scored positions are projected onto the vocabulary. Perplexity's sliding windows
  share nothing, so they take this path.
- `score_shared` runs through the inference engine: each distinct context (the sequence before its
  scored tokens: a multiple-choice question, its few-shot examples) is computed once, each
  continuation forks its KV blocks and computes only its own tokens, and blocks shared with earlier
  contexts (the same few-shot examples in another item) come from the prefix cache. Multiple choice
  and lm-eval's log-likelihood requests take this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from gptlab.model import GPT


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    @property
    def eot_id(self) -> int: ...


@torch.no_grad()
def score_tokens(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[Tensor, Tensor]]:
    """For each sequence s and count n: (log P(s[i] | s[:i]) for the last n positions i, float32 (n,);
    whether each of those tokens is the argmax prediction, bool (n,))."""
    _check_requests(model, sequences, n_scored, batch_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        return _score_batches(model, sequences, n_scored, batch_size, progress, desc, device)
    finally:
        model.train(was_training)


def _check_requests(model: GPT, sequences: Sequence[Sequence[int]], n_scored: Sequence[int], batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_ctx = model.config.n_ctx
    for i, (seq, n) in enumerate(zip(sequences, n_scored, strict=True)):
        if not 1 <= n <= len(seq) - 1:
            raise ValueError(f"request {i}: cannot score {n} of {len(seq)} tokens (the first has no context)")
        if len(seq) - 1 > n_ctx:
            raise ValueError(f"request {i}: {len(seq) - 1} input tokens exceed the context of {n_ctx}")


def _score_batches(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int,
    progress: bool,
    desc: str,
    device: torch.device,
) -> list[tuple[Tensor, Tensor]]:
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: OOM early
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(sequences)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        T = len(sequences[batch[0]]) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, i in enumerate(batch):
            seq = sequences[i]
            x[b, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
            start = len(seq) - 1 - n_scored[i]  # logits at position p predict token p + 1
            rows += [b] * n_scored[i]
            cols += range(start, len(seq) - 1)
            targets += seq[len(seq) - n_scored[i] :]
        hidden = model.features(x.to(device))  # (B, T, C)
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = model.logits(hidden[index]).float()  # (N, vocab): scored positions only
        target = torch.tensor(targets, device=device)
        token_lp = (logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(-1)).cpu()
        greedy = (logits.argmax(-1) == target).cpu()
        offset = 0
        for i in batch:
            n = n_scored[i]
            results[i] = (token_lp[offset : offset + n], greedy[offset : offset + n])
            offset += n
    return results  # type: ignore[return-value]


@torch.no_grad()
def score_shared(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "scoring",
) -> list[tuple[Tensor, Tensor]]:
    """What `score_tokens` returns, computing each distinct context once (see the module docstring).
    `batch_size` counts contexts computed together."""
    from gptlab.infer.cache import BLOCK_SIZE
    from gptlab.infer.engine import InferenceEngine

    _check_requests(model, sequences, n_scored, batch_size)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, n) in enumerate(zip(sequences, n_scored, strict=True)):
        groups.setdefault(tuple(seq[: len(seq) - n]), []).append(i)
    contexts = list(groups)  # in request order: neighbouring items tend to share few-shot examples
    batches = [contexts[j : j + batch_size] for j in range(0, len(contexts), batch_size)]

    def tokens_for(batch: list[tuple[int, ...]]) -> int:
        own = sum(n_scored[i] + 2 * BLOCK_SIZE for ctx in batch for i in groups[ctx])
        return sum(len(ctx) + BLOCK_SIZE for ctx in batch) + own

    # room for a few batches, so blocks shared with earlier contexts are still cached when asked for
    engine = InferenceEngine(model, kv_cache_tokens=4 * max(map(tokens_for, batches)))
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            heads = [engine.sequence(list(ctx)) for ctx in batch]
            first = engine.forward(heads)  # (B, V): each context's last position predicts a first token
            forks, counts, plan = [], [], []
            for b, ctx in enumerate(batch):
                for i in groups[ctx]:
                    continuation = list(sequences[i][len(ctx) :])
                    if len(continuation) > 1:
                        fork = engine.fork(heads[b])
                        fork.tokens.extend(continuation[:-1])
                        forks.append(fork)
                        counts.append(len(continuation) - 1)
                    plan.append((i, b, continuation))
            rest = engine.forward(forks, counts) if forks else None
            offset = 0
            for i, b, continuation in plan:
                n = len(continuation)
                logits = first[b : b + 1]
                if n > 1:
                    logits = torch.cat([logits, rest[offset : offset + n - 1]])
                    offset += n - 1
                target = torch.tensor(continuation, device=logits.device)
                token_lp = (logits.gather(1, target[:, None]).squeeze(1) - logits.logsumexp(-1)).cpu()
                results[i] = (token_lp, (logits.argmax(-1) == target).cpu())
            for seq in (*forks, *heads):
                engine.free(seq)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness makes them.

    Trailing whitespace of the context moves to the continuation (so " Paris" keeps its leading space
    and tokenizes as in running text); the continuation's ids are those of context + continuation
    after the context's own ids. An empty context becomes the end-of-text token.
    """
    if not continuation:
        raise ValueError(f"empty continuation for context {context[-40:]!r}; nothing to score")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def score_pairs(
    model: GPT,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "log-likelihood",
    reuse: bool = True,
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), whether greedy decoding yields the continuation) per pair
    of token-id lists. Contexts longer than the model's window lose their oldest tokens (lm-eval's rule);
    a continuation that alone does not fit raises. reuse=True computes each distinct context once
    (`score_shared`); reuse=False every sequence whole (`score_tokens`)."""
    n_ctx = model.config.n_ctx
    sequences, counts = [], []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("empty continuation; nothing to score")
        if not context:
            raise ValueError("empty context: condition on the end-of-text token instead (see encode_pair)")
        if len(continuation) > n_ctx:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds the context of {n_ctx}")
        sequences.append([*context, *continuation][-(n_ctx + 1) :])
        counts.append(len(continuation))
    score = score_shared if reuse else score_tokens
    scored = score(model, sequences, counts, batch_size=batch_size, progress=progress, desc=desc)
    return [(float(lp.double().sum()), bool(greedy.all())) for lp, greedy in scored]


def loglikelihood(
    model: GPT,
    tokenizer: TextTokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = False,
    reuse: bool = True,
) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` on text: (log P(continuation | context), is_greedy) per request."""
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    return score_pairs(model, pairs, batch_size=batch_size, progress=progress, reuse=reuse)


def greedy_until(
    model: GPT,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    stop: Sequence[Sequence[str]],
    max_tokens: Sequence[int],
    batch_size: int = 16,
    progress: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[str]:
    """Greedy completion of each prompt (its own stop strings and token limit), cut before the first
    stop string; end-of-text also stops. Prompts too long for the window lose their oldest tokens.
    `num_beams` > 1: beam search (with `length_penalty`) instead of greedy decoding.

    Prompts sharing stop strings and limit run as one left-padded batch through `gptlab.infer.generate`.
    """
    from gptlab.infer.generate import generate
    from gptlab.infer.sampling import SamplingParams

    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for i, (s, m) in enumerate(zip(stop, max_tokens, strict=True)):
        groups.setdefault((tuple(s), int(m)), []).append(i)
    out: list[str] = [""] * len(prompts)
    chunks = [
        (key, idx[j : j + batch_size]) for key, idx in groups.items() for j in range(0, len(idx), batch_size)
    ]
    for (s, m), idx in tqdm(chunks, desc="generating", unit="batch", disable=not progress):
        params = SamplingParams(max_new_tokens=m, temperature=0.0, stop=list(s), num_beams=num_beams,
                                length_penalty=length_penalty)  # fmt: skip
        completions = generate(model, tokenizer, [prompts[i] for i in idx], params)
        for i, c in zip(idx, completions, strict=True):
            out[i] = c.text
    return out
