"""Formatted texts as token ids, cut to the backbone's length limit without cutting the response.

A formatted text (the dataset's format, by default ``Human: {prompt}\\n\\nAssistant: {response}``) longer
than ``max_length`` tokens loses
tokens from the *start of its prompt* first (the end of a prompt, nearest the response, is kept); only a
response that does not fit on its own, after the whole prompt is gone, is cut, from its end. Special
tokens (CLS/SEP, BOS/EOS) always stay. Each text gets a cut code: :data:`WHOLE`, :data:`PROMPT_CUT` or
:data:`RESPONSE_CUT`, counted in results and by ``coplctl data inspect --backbone``.

The prompt's tokens are found from a fast tokenizer's character offsets; a slow tokenizer (no offsets)
cuts from the right, as before, and every text it cuts counts as a cut response.

The length limit defaults to the model's own: the ``max_seq_length`` a sentence-transformers model
declares (``sentence_bert_config.json``: 256 for all-MiniLM-L6-v2, which was trained on short texts),
else the smaller of the tokenizer's ``model_max_length`` and the model's position embeddings, at most
:data:`FALLBACK_MAX_LENGTH` (decoders declare thousands of positions; lora-mode memory grows with length).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coplctl.data.dataset import TEXT_FORMAT

WHOLE, PROMPT_CUT, RESPONSE_CUT = 0, 1, 2
FALLBACK_MAX_LENGTH = 512  # models that declare no max_seq_length (the limit used before there was one)


def own_max_length(source: str, config, tokenizer) -> int:
    """The model's own length limit (see the module's docstring)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        declared = json.loads(Path(path).read_text()).get("max_seq_length") if path else None
    except (OSError, ValueError, AttributeError):
        declared = None
    if isinstance(declared, int) and declared > 0:
        return declared
    limits = [n for n in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits + [FALLBACK_MAX_LENGTH])


def _prompt_span(offsets: list[tuple[int, int]], at: int, prompt_len: int) -> tuple[int, int]:
    """[a, b): the token positions whose characters lie in the prompt, which starts at character ``at`` (a token
    may start at the space before it, as sentencepiece tokenizers' offsets do); (0, 0) without a prompt."""
    if at < 0:
        return 0, 0
    end = at + prompt_len
    inside = [j for j, (s, e) in enumerate(offsets) if at - 1 <= s < e <= end and e > at]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _cut(ids: list[int], offsets: list[tuple[int, int]], at: int, prompt_len: int, limit: int) -> tuple[list[int], int]:
    excess = len(ids) - limit
    a, b = _prompt_span(offsets, at, prompt_len)
    if b - a >= excess:
        return ids[:a] + ids[a + excess:], PROMPT_CUT
    ids, offsets = ids[:a] + ids[b:], offsets[:a] + offsets[b:]
    special = 0  # trailing special tokens (SEP, EOS) stay
    while special < len(offsets) and offsets[len(offsets) - 1 - special] == (0, 0):
        special += 1
    body = len(ids) - special
    keep = max(0, body - (len(ids) - limit))
    return (ids[:keep] + ids[body:])[:limit], RESPONSE_CUT


def encode(tokenizer, max_length: int, prompts, responses, text_format: str = TEXT_FORMAT
           ) -> tuple[list[list[int]], np.ndarray]:
    """(token ids per formatted text, cut code per text) for parallel sequences of prompts and responses."""
    prompts, responses = list(prompts), list(responses)
    texts = [text_format.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    at = text_format.find("{prompt}")  # where the prompt starts in a formatted text (-1: no prompt)
    cuts = np.zeros(len(texts), dtype=np.uint8)
    if not texts:
        return [], cuts
    if not tokenizer.is_fast:
        ids = tokenizer(texts, verbose=False)["input_ids"]
        cuts[[i for i, t in enumerate(ids) if len(t) > max_length]] = RESPONSE_CUT
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], cuts
    enc = tokenizer(texts, return_offsets_mapping=True, verbose=False)
    ids = enc["input_ids"]
    for i in [i for i, t in enumerate(ids) if len(t) > max_length]:
        ids[i], cuts[i] = _cut(ids[i], [tuple(o) for o in enc["offset_mapping"][i]], at, len(prompts[i]), max_length)
    return ids, cuts


def cut_counts(cuts: np.ndarray) -> dict[str, int]:
    """``{"prompt": texts whose prompt was shortened, "response": texts whose response was cut}``."""
    cuts = np.asarray(cuts)
    return {"prompt": int((cuts == PROMPT_CUT).sum()), "response": int((cuts == RESPONSE_CUT).sum())}
