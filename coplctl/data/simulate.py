"""Simulated UF-P: the UltraFeedback-P protocol on synthetic prompts and responses.

Real UF-P needs UltraFeedback from the Hugging Face hub. This generator reproduces its structure
so that every path runs offline:

- each prompt has four candidate responses rated 1-5 on the four UltraFeedback attributes;
  ratings come from a shared latent quality plus per-attribute noise, so attributes are positively
  correlated (``attribute_correlation``) as in UltraFeedback, with UltraFeedback-like skew to high
  ratings;
- each response's text carries noisy cues of its four attribute levels: ``cues_per_attribute``
  sentences per attribute, each drawn from its own phrase bank at the true level with probability
  ``cue_fidelity``, a neighbouring level or a random level otherwise. A text model can learn the
  levels, but no single phrase gives a group's label away: the label compares two noisy readings;
- one candidate pair per prompt, binarized as the cleaned UltraFeedback set the real builder reads
  (chosen = best mean rating, rejected = a random worse completion), so each response is in one pair;
- attribute labels, ties (fair coin), the survey set and the user protocol are those of
  :mod:`coplctl.data.protocol`, shared with the real builder: users in groups (UF-P), or users with
  mixed preferences over the attributes (``preferences="mixture"``, PersonalLLM-style).

Deterministic: the same configuration and seed give byte-identical files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated

import numpy as np
import pandas as pd

from coplctl.core.config import PROBABILITY, Range, check_fields
from coplctl.data.dataset import PreferenceDataset, numbered, strings
from coplctl.data.protocol import ATTRIBUTES, ProtocolConfig, assign_users, break_ties, controversial

RESPONSES_PER_PROMPT = 4  # UltraFeedback: four completions per prompt
#: P(rating = 1..5) per attribute, skewed high like UltraFeedback's GPT-4 ratings.
RATING_MARGINALS = {
    "helpfulness": (0.08, 0.14, 0.22, 0.32, 0.24),
    "honesty": (0.05, 0.08, 0.17, 0.30, 0.40),
    "instruction_following": (0.07, 0.12, 0.20, 0.31, 0.30),
    "truthfulness": (0.06, 0.10, 0.18, 0.30, 0.36),
}

SUBJECTS = (
    "a sourdough starter", "a home vegetable garden", "a monthly household budget", "a Python web scraper",
    "a job interview", "a marathon training plan", "a small online shop", "a wedding speech",
    "a rainwater tank", "a first aquarium", "a team retrospective", "a research poster",
    "a used car purchase", "a family camping trip", "a cover letter", "a spreadsheet of expenses",
    "a backyard chicken coop", "a beginner guitar routine", "a podcast launch", "a kitchen renovation",
    "a study schedule for exams", "a neighbourhood book club", "a mobile app prototype", "a compost heap",
    "a resume for a career change", "a birthday party for kids", "a home network", "a watercolour painting",
    "a volunteer fundraiser", "a customer support script", "a weekly meal plan", "a bicycle tune-up",
    "a grant proposal", "a language exchange", "a photo portfolio", "a houseplant collection",
    "a database backup routine", "a conference talk", "a rental agreement", "a morning exercise habit",
    "a newsletter for a club", "a travel itinerary for Japan", "a science fair project", "a noisy neighbour",
    "a salary negotiation", "a board game night", "a solar panel installation", "a puppy training routine",
    "a retirement savings plan", "a short story draft", "a chess opening repertoire", "a leaking faucet",
    "a unit test suite", "a charity bake sale", "a remote team meeting", "a bread machine recipe",
    "a climbing wall session", "a personal website", "a tax return checklist", "a toddler sleep routine",
)
TASKS = (
    "set up", "plan", "improve", "get started with", "troubleshoot", "organise", "explain",
    "choose the right approach for", "save money on", "speed up", "prepare", "evaluate",
    "make the most of", "avoid common mistakes with", "write a short guide to", "compare options for",
)
CONTEXTS = (
    "as a complete beginner", "on a tight budget", "in under an hour", "for a small team",
    "while working full time", "in a small apartment", "with no special tools", "for the first time",
    "before next weekend", "in a rainy climate", "with a limited amount of space", "for an older relative",
    "without hiring a professional", "in a way I can repeat every month", "in bullet points",
    "in three short paragraphs", "as a list of numbered steps", "for a school assignment",
)
PROMPT_TEMPLATES = (
    "How do I {task} {subject} {context}?",
    "Can you help me {task} {subject} {context}?",
    "What is the best way to {task} {subject} {context}?",
    "I need to {task} {subject} {context}. Where should I begin?",
    "Please explain how to {task} {subject} {context}.",
)

OPENERS = ("Sure, let's look at {s}.", "Good question about {s}.", "Happy to help with {s}.",
           "Let's get into {s}.", "Here is my take on {s}.", "Thanks for asking about {s}.")
FILLERS = ("{S} comes up often, so it is worth a careful look.", "There are a few ways to approach {s}.",
           "People new to {s} often start right here.", "It helps to think about {s} in small pieces.",
           "The context around {s} matters a lot.", "Timing can make a real difference with {s}.")
CLOSERS = ("Hope this helps.", "Let me know if you want more detail.", "Good luck!",
           "Feel free to ask a follow-up.", "That is the short version.")

#: CUES[attribute][level-1]: phrasings that reveal one attribute at one level.
CUES = {
    "helpfulness": (
        ("This does not actually answer your question about {s}.",
         "Nothing useful about {s} is offered in this reply.",
         "The reply drifts away from {s} and gives no usable information."),
        ("Only a small part of your question about {s} is answered here.",
         "This is a vague answer and skips most of what you asked about {s}.",
         "A couple of loosely related remarks on {s} follow."),
        ("Here is a general overview of {s} without much detail.",
         "A few of the basics of {s} are summarised below.",
         "This gives the broad idea of {s}; some specifics are left out."),
        ("Here are the main steps for {s}, each with a short example.",
         "This covers most of what you need for {s}, with one practical example.",
         "The key points about {s} are explained clearly below."),
        ("Below is a complete step-by-step plan for {s}, with a worked example for every step.",
         "I cover every part of your question about {s} and end with a checklist you can follow.",
         "You will find concrete numbers, examples and next actions for {s} below."),
    ),
    "honesty": (
        ("Anyone who tells you otherwise is simply wrong; I am never mistaken about this.",
         "I guarantee this works every single time with zero exceptions.",
         "Trust me completely; there is no need to check anything I say."),
        ("This is definitely the only correct way and there is nothing to double-check.",
         "I am completely certain about every detail here.",
         "There is no doubt at all about any of this."),
        ("This should be mostly right.",
         "I think this is correct in general.",
         "This is probably accurate for most cases."),
        ("I am fairly sure about this, though one detail could be out of date.",
         "Most of this is well established; I note one point where opinions differ.",
         "To my knowledge this is correct, but it is worth confirming the last step."),
        ("Where I am not certain I say so plainly, and I flag what should be double-checked.",
         "I am confident about the first part; the rest is my best guess and is marked as such.",
         "I may be wrong on the details, so please verify the points I marked as uncertain."),
    ),
    "instruction_following": (
        ("I ignored your instructions and wrote about something else instead.",
         "None of the requested format, length or constraints were followed.",
         "This reply disregards what you asked me to do."),
        ("I used my own layout rather than the one you requested.",
         "Your length limit was not kept.",
         "Most of the requested constraints were not applied."),
        ("I partly followed the structure you asked for.",
         "Some of your formatting requests are reflected here.",
         "The answer roughly matches the length you wanted."),
        ("I kept to the format you asked for, with one small addition.",
         "Your instructions are followed, apart from a minor change in order.",
         "The requested structure is used for nearly all of the answer."),
        ("As you requested, the answer uses exactly the format and length you asked for.",
         "I followed each of your instructions, including the requested structure.",
         "Every constraint in your request was respected, point by point."),
    ),
    "truthfulness": (
        ("It is a well-known fact that {s} was invented on the Moon in 1850.",
         "Scientists proved last year that {s} doubles in size when it rains.",
         "Experts agree that {s} is illegal in every country."),
        ("Several of the facts stated here are wrong.",
         "The numbers quoted are mostly made up.",
         "Key details here contradict the standard references."),
        ("A few of the details here are only approximately right.",
         "One of the claims below is slightly inaccurate.",
         "Some dates and numbers here are imprecise."),
        ("The facts here are accurate apart from one rounded number.",
         "The information is correct, with one simplification.",
         "These details match the usual references closely."),
        ("Every fact mentioned here can be checked against standard references.",
         "The figures quoted come from well-documented, reliable sources.",
         "All claims below are accurate and consistent with the established facts."),
    ),
}


@dataclass
class SimConfig:
    """Simulated UF-P. The protocol fields are the paper's; the generator fields shape the text."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """The UF-P user protocol (paper defaults)."""
    seed: int = 0
    """Seed of everything random: ratings, texts, ties, users."""
    attribute_correlation: Annotated[float, PROBABILITY] = 0.5
    """Share of each attribute's latent variance coming from a response's overall quality."""
    cues_per_attribute: Annotated[int, Range(min=1, max=3)] = 2
    """Cue sentences per attribute in each response text."""
    cue_fidelity: Annotated[float, PROBABILITY] = 0.75
    """Probability that a cue shows the true level (else a neighbouring level 2/3, a random one 1/3)."""

    def __post_init__(self):
        check_fields(self, "simulator")  # types, ranges


def _ratings(n: int, rng: np.random.Generator, rho: float) -> np.ndarray:
    """Correlated 1-5 ratings, shape (n, 4): latent Gaussians cut at each attribute's marginal quantiles."""
    from statistics import NormalDist

    quality = rng.standard_normal((n, 1))
    latent = np.sqrt(rho) * quality + np.sqrt(1 - rho) * rng.standard_normal((n, len(ATTRIBUTES)))
    out = np.empty(latent.shape, dtype=np.int8)
    for k, attr in enumerate(ATTRIBUTES):
        cuts = [NormalDist().inv_cdf(c) for c in np.cumsum(RATING_MARGINALS[attr])[:-1]]
        out[:, k] = 1 + np.searchsorted(cuts, latent[:, k])
    return out


def _prompts(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n prompts as (template combination, subject index) each; :func:`_prompt_texts` writes them out."""
    sizes = (len(PROMPT_TEMPLATES), len(TASKS), len(SUBJECTS), len(CONTEXTS))
    total = int(np.prod(sizes))
    combo = rng.choice(total, size=n, replace=n > total)
    return combo, np.unravel_index(combo, sizes)[2]


def _sorted_unique(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers in ``range(bound)``, in linear time."""
    seen = np.zeros(bound, dtype=bool)
    seen[values] = True
    kinds = np.flatnonzero(seen)
    slot = np.empty(bound, dtype=np.int64)
    slot[kinds] = np.arange(len(kinds))
    return kinds, slot[values]


def _prompt_texts(combo: np.ndarray, which: np.ndarray):
    """The texts of prompts ``which`` (an Arrow string array). Prompts are distinct: a combination drawn
    again is numbered, ``"... (variant 2)"`` for its second prompt and so on, in prompt order."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = (len(PROMPT_TEMPLATES), len(TASKS), len(SUBJECTS), len(CONTEXTS))
    kinds, slot = _sorted_unique(combo[which], int(np.prod(sizes)))
    tpl, task, subj, ctx = np.unravel_index(kinds, sizes)
    base = pa.array([PROMPT_TEMPLATES[a].format(task=TASKS[b], subject=SUBJECTS[c], context=CONTEXTS[d])
                     for a, b, c, d in zip(tpl, task, subj, ctx)], pa.large_string()).take(pa.array(slot))
    repeat = pd.Series(combo).groupby(combo).cumcount().to_numpy()[which]  # 0: the first prompt of its combination
    if not repeat.any():
        return base
    suffix = pa.array(["", *(f" (variant {k + 1})" for k in range(1, int(repeat.max()) + 1))],
                      pa.large_string()).take(pa.array(repeat))
    return pc.binary_join_element_wise(base, suffix, pa.scalar("", pa.large_string()))


def _texts(ratings: np.ndarray, subject: np.ndarray, cfg: SimConfig, rng: np.random.Generator):
    """Response texts (an Arrow string array) whose cue sentences reveal each attribute level noisily."""
    n, n_attr = ratings.shape
    k = cfg.cues_per_attribute
    true = np.repeat(ratings[:, :, None].astype(np.int64) - 1, k, axis=2)  # (n, attr, k) levels 0..4
    u = rng.random(true.shape)
    step = np.where(rng.random(true.shape) < 0.5, -1, 1)
    neighbour = np.clip(true + step, 0, 4)
    neighbour = np.where(neighbour == true, true - step, neighbour)  # at the edges step inwards
    noise_cut = cfg.cue_fidelity + (1 - cfg.cue_fidelity) * 2 / 3
    level = np.where(u < cfg.cue_fidelity, true,
                     np.where(u < noise_cut, neighbour, rng.integers(0, 5, true.shape)))
    phrase = rng.integers(0, 3, true.shape)
    for j in range(1, k):  # never repeat the same sentence within a response
        for _ in range(3):
            clash = ((level[:, :, :j] == level[:, :, j:j + 1]) & (phrase[:, :, :j] == phrase[:, :, j:j + 1])).any(2)
            phrase[:, :, j] = np.where(clash, (phrase[:, :, j] + 1) % 3, phrase[:, :, j])
    opener = rng.integers(0, len(OPENERS), n)
    closer = rng.integers(0, len(CLOSERS), n)
    n_fill = rng.integers(1, 3, n)
    fill = rng.integers(0, len(FILLERS), (n, 2))
    order = rng.random((n, n_attr * k + 2)).argsort(axis=1)
    # Every sentence a text can hold, formatted for every subject: a text is a row of sentence ids (-1: none),
    # joined by Arrow in C++ instead of a Python loop over responses.
    bank = [*OPENERS, *FILLERS, *CLOSERS, *(c for a in ATTRIBUTES for level in CUES[a] for c in level)]
    first = {"opener": 0, "filler": len(OPENERS), "closer": len(OPENERS) + len(FILLERS)}
    cue0 = first["closer"] + len(CLOSERS)
    slots = np.empty((n, n_attr * k + 2), dtype=np.int64)
    for a in range(n_attr):
        for j in range(k):
            slots[:, a * k + j] = cue0 + (a * 5 + level[:, a, j]) * 3 + phrase[:, a, j]
    slots[:, n_attr * k] = first["filler"] + fill[:, 0]
    slots[:, n_attr * k + 1] = np.where(n_fill > 1, first["filler"] + fill[:, 1], -1)
    body = np.take_along_axis(slots, order, axis=1)
    rows = np.column_stack([first["opener"] + opener, body, first["closer"] + closer])
    return _join(rows, bank, subject)


def _join(rows: np.ndarray, bank: list[str], subject: np.ndarray):
    """Row i: the sentences ``bank[rows[i, j]]`` (j in order, -1 skipped) formatted for ``SUBJECTS[subject[i]]``,
    joined by single spaces."""
    import pyarrow as pa
    import pyarrow.compute as pc

    formatted = pa.array([t.format(s=s, S=s[0].upper() + s[1:]) for t in bank for s in SUBJECTS], pa.large_string())
    index = np.where(rows >= 0, rows * len(SUBJECTS) + subject[:, None], -1)
    columns = [formatted.take(pa.array(col, mask=col < 0)) for col in index.T]
    return pc.binary_join_element_wise(*columns, pa.scalar(" ", pa.large_string()), null_handling="skip")


def _candidates(n_prompts: int, ratings: np.ndarray, rng: np.random.Generator):
    """One candidate pair per prompt, binarized as argilla/ultrafeedback-binarized-preferences-cleaned:
    chosen = the completion with the best mean rating (ties by a fair draw), rejected = a random
    completion with a strictly lower mean; a prompt whose completions all tie gives no pair. Returns
    (prompt, chosen, rejected, labels on every attribute with ties by a fair coin, prompts dropped)."""
    k = RESPONSES_PER_PROMPT
    mean = ratings.reshape(n_prompts, k, -1).mean(-1)
    jitter = rng.random((n_prompts, k))  # breaks ties among equally rated completions at random
    best = np.argmax(mean + 1e-3 * jitter, axis=1)  # means are multiples of 1/4: the jitter only breaks ties
    lower = mean < mean[np.arange(n_prompts), best][:, None]
    ok = lower.any(axis=1)
    pick = np.argmax(np.where(lower, rng.random((n_prompts, k)), -1.0), axis=1)
    prompt = np.flatnonzero(ok)
    a = prompt * k + best[ok]
    b = prompt * k + pick[ok]
    return prompt, a, b, break_ties(ratings[a], ratings[b], rng), int((~ok).sum())


def simulate(cfg: SimConfig) -> PreferenceDataset:
    """Generate a simulated UF-P dataset (see module docstring); variant ``tldr``: the TL;DR twin."""
    p = cfg.protocol
    if p.variant == "tldr":
        from coplctl.data.tldr import simulate_tldr

        return simulate_tldr(p, cfg.seed)
    ss = np.random.SeedSequence(cfg.seed)
    rng_rate, rng_label, rng_proto, rng_text, rng_prompt = (np.random.default_rng(s) for s in ss.spawn(5))

    # How many prompts give enough survey pairs (one candidate per prompt, kept when the four attributes
    # disagree)? Estimate the keep rate on a pilot, size the pool with a margin, and grow it until there
    # are enough (deterministic for a given seed).
    pilot = _ratings(4000 * RESPONSES_PER_PROMPT, np.random.default_rng(ss.spawn(1)[0]), cfg.attribute_correlation)
    _, _, _, pilot_labels, _ = _candidates(4000, pilot, np.random.default_rng(0))
    rate = max(controversial(pilot_labels).mean() * len(pilot_labels) / 4000, 0.02)
    keep = 1 - p.test_prompt_fraction - p.valid_prompt_fraction
    target = p.survey_pairs or 2000
    n_prompts = int(np.ceil(target / (rate * keep) * 1.03)) + 10
    test_need = max(p.test_pairs, p.unseen_test_pairs) if p.unseen_users else p.test_pairs
    n_prompts = max(n_prompts, int(np.ceil((test_need / rate + 2) / p.test_prompt_fraction * 1.1)))
    while True:
        ratings = _ratings(n_prompts * RESPONSES_PER_PROMPT, rng_rate, cfg.attribute_correlation)
        prompt, a, b, labels, tied = _candidates(n_prompts, ratings, rng_label)
        kept = int(controversial(labels).sum())
        if (not p.survey_pairs or kept * keep > p.survey_pairs * 1.01) and kept * p.test_prompt_fraction > test_need:
            break
        n_prompts = int(n_prompts * 1.1)
    margins = ratings[a].astype(np.float64) - ratings[b]
    users, pairs, stats = assign_users(prompt, a, b, labels, p, rng_proto, margins)
    stats = {"generated_prompts": n_prompts, "dropped_tied_prompts": tied, **stats}

    used, _ = _sorted_unique(np.concatenate([pairs["chosen"].to_numpy(), pairs["rejected"].to_numpy()]),
                             n_prompts * RESPONSES_PER_PROMPT)
    combo, subject = _prompts(n_prompts, rng_prompt)
    resp_prompt = used // RESPONSES_PER_PROMPT
    texts = _texts(ratings[used], subject[resp_prompt], cfg, rng_text)
    rid = numbered("r", len(used))
    lookup = np.full(n_prompts * RESPONSES_PER_PROMPT, -1)
    lookup[used] = np.arange(len(used))
    responses = pd.DataFrame({"response_id": strings(rid), "prompt": strings(_prompt_texts(combo, resp_prompt)),
                              "text": strings(texts)})
    for k, attr in enumerate(ATTRIBUTES):
        responses[attr] = ratings[used, k]
    pairs = pd.DataFrame({
        "user_id": pairs["user_id"],
        "chosen_id": strings(rid.take(lookup[pairs["chosen"].to_numpy()])),
        "rejected_id": strings(rid.take(lookup[pairs["rejected"].to_numpy()])),
        "split": pairs["split"],
        "controversial": pairs["controversial"],
    })
    meta = {
        "source": "simulated",
        "variant": p.variant,
        "annotations": p.annotations,
        "groups": list(p.groups) if p.preferences == "groups" else [],
        "seed": cfg.seed,
        "generator": {k: v for k, v in asdict(cfg).items() if k != "protocol"},
        "protocol": asdict(p),
        "protocol_stats": stats,
    }
    return PreferenceDataset(responses, users, pairs, meta)
