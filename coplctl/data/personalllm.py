"""Build PersonalLLM preference data as the CoPL authors' generator does (camera-ready, "PLM").

Input: ``namkoong-lab/PersonalLLM``: one row per prompt with ``prompt``, eight responses
``response_1`` .. ``response_8`` and, for each response ``i`` and reward model ``m``, its score
``response_{i}_{m}``. A local copy is a directory of Parquet / JSONL / JSON files whose names start with
``train`` or ``test`` (the hub's layout, ``data/train-00000-of-00001.parquet``), or the hub id read
through ``datasets`` (the ``hub`` extra).

Steps, as the authors' generator:
- responses 5, 6 and 7 of every prompt, scored by four of the ten reward models (gemma_7b,
  mistral_weqweasdas, llama3_sfairx, oasst_deberta_v3); empty or duplicate responses of a prompt and
  prompts seen before are dropped and counted; optionally responses over ``max_tokens`` (the authors: 1024);
- candidate pairs: the three pairs of a prompt's responses, kept unless every reward model orders them
  the same way strictly (a tie keeps the pair);
- the dataset's own split: pairs on ``train`` prompts form the survey, pairs on ``test`` prompts the
  test pool;
- users: the shared protocol (:mod:`coplctl.data.protocol`) with ``preferences: mixture``: each user
  weighs the reward models with Dirichlet(0.1) weights and prefers the response with the higher weighted
  score; ALL = 16 annotations (15 train + 1 valid), AVG = 1-31; 100 test pairs per seen user (as the
  authors' generator draws them; their reward-model script evaluates 11 of them, 10% of which it uses for
  model selection, so about 10 a user); 100 unseen users with 16 few-shot pairs (as UF-P-4; the authors'
  generator has none).
- text format: the response alone (``{response}``), as the authors' generator feeds it (``--text-format``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.errors import CoplError, DataError
from coplctl.data.dataset import PreferenceDataset, RESPONSE_ONLY, check_text_format
from coplctl.data.protocol import ProtocolConfig, assign_users, break_ties
from coplctl.data.ultrafeedback import assemble, hub_dataset, input_files, length_filter, location, read_records, sha256

PLM_HUB_ID = "namkoong-lab/PersonalLLM"
#: The authors' four of PersonalLLM's ten reward models.
REWARD_MODELS = ("gemma_7b", "mistral_weqweasdas", "llama3_sfairx", "oasst_deberta_v3")
RESPONSES = (5, 6, 7)


def plm_protocol(**kw) -> ProtocolConfig:
    """The authors' PersonalLLM protocol: mixture users, 16 annotations, every survey pair, 100 test pairs."""
    return ProtocolConfig(**{"variant": "uf-p-4", "annotations": "all", "preferences": "mixture", "alpha": 0.1,
                             "survey_pairs": 0, "test_pairs": 100, **kw})


@dataclass
class PersonalLLMConfig:
    """PersonalLLM builder; the defaults are the authors' generator's."""

    protocol: ProtocolConfig = field(default_factory=plm_protocol)
    """The user protocol (mixture users; see :func:`plm_protocol`)."""
    seed: int = 0
    source: str = PLM_HUB_ID
    """A local copy (directory of train*/test* files) or the hub id."""
    reward_models: tuple[str, ...] = REWARD_MODELS
    """Reward models whose scores the users mix (the authors' four)."""
    responses: tuple[int, ...] = RESPONSES
    """Which of a prompt's responses are used (the authors': 5, 6, 7)."""
    tokenizer: str | None = None
    max_tokens: int | None = None
    text_format: str = RESPONSE_ONLY
    """How backbones read a (prompt, response) pair: the authors' generator feeds the response alone
    (datagen_plm.py: ``{response}``; stored in meta.json)."""

    def __post_init__(self):
        check_text_format(self.text_format)
        if self.protocol.preferences != "mixture":
            raise CoplError("PersonalLLM users have mixed preferences: the protocol needs preferences: mixture")
        if len(self.responses) < 2 or len(set(self.responses)) != len(self.responses):
            raise CoplError("responses: at least two distinct response numbers (1-8)")
        if len(self.reward_models) < 2 or len(set(self.reward_models)) != len(self.reward_models):
            raise CoplError("reward_models (--reward-models): at least two distinct reward models")


def _rows(cfg: PersonalLLMConfig):
    """(split, file, row-or-line, record) of every prompt, from local files or the hub."""
    columns = ("prompt", *(f"response_{i}" for i in cfg.responses),
               *(f"response_{i}_{m}" for i in cfg.responses for m in cfg.reward_models))
    path = Path(cfg.source).expanduser()
    if path.exists():
        files = input_files(path)
        split_of = {f: "test" if f.name.startswith("test") else "train" if f.name.startswith("train") else None
                    for f in files}
        unnamed = [f for f, s in split_of.items() if s is None]
        if unnamed:
            raise DataError(unnamed[0], "a PersonalLLM file's name must start with train or test (its split)")
        if "test" not in split_of.values():
            raise DataError(path, "holds no test* file: PersonalLLM's test split is the test pool")
        for f in sorted(files, key=lambda f: split_of[f] != "train"):  # train first, as the hub's splits
            for _, n, rec in read_records(f, columns):
                yield split_of[f], f, n, rec
        return
    ds = hub_dataset(cfg.source)
    for split in ("train", "test"):
        for n, rec in enumerate(ds[split].select_columns(list(columns))):
            yield split, Path(cfg.source), n, rec


def _float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:  # an integer beyond any float
        return float("inf")


def _read(cfg: PersonalLLMConfig, stats: dict) -> pd.DataFrame:
    """One row per usable response: prompt, split, text, one score per reward model."""
    out, seen = [], set()
    for split, f, n, rec in _rows(cfg):
        loc = location(f, n)
        if not isinstance(rec, dict):
            raise DataError(f, f"each record must be a JSON object, not {type(rec).__name__}", **loc)
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f, "missing or empty field prompt", **loc)
        stats["prompts_read"] += 1
        if rec["prompt"] in seen:
            stats["dropped_duplicate_prompts"] += 1
            continue
        seen.add(rec["prompt"])
        texts = set()
        for i in cfg.responses:
            text = rec.get(f"response_{i}")
            if text is not None and not isinstance(text, str):
                raise DataError(f, f"field response_{i} must be a text (or null when missing), not {type(text).__name__}",
                                **loc)
            if text is None or not text.strip() or text in texts:
                stats["dropped_empty_or_duplicate_responses"] += 1
                continue
            scores = []
            for m in cfg.reward_models:
                v = rec.get(f"response_{i}_{m}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(_float(v)):
                    raise DataError(f, f"field response_{i}_{m} must be a finite number (the score of reward "
                                       f"model {m}), not {v!r}", **loc)
                scores.append(float(v))
            texts.add(text)
            out.append((rec["prompt"], split, text, *scores))
    return pd.DataFrame(out, columns=["prompt", "split", "text", *cfg.reward_models])


def build_personalllm(cfg: PersonalLLMConfig) -> PreferenceDataset:
    """Build PersonalLLM preference data (see the module docstring)."""
    stats = {"prompts_read": 0, "dropped_duplicate_prompts": 0, "dropped_empty_or_duplicate_responses": 0}
    rng_label, rng_proto = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(2))
    comps = length_filter(_read(cfg, stats), cfg, stats)
    comps["prompt_idx"] = pd.factorize(comps["prompt"])[0]
    a, b = [], []
    for idx in comps.groupby("prompt_idx", sort=True).indices.values():
        for j in range(len(idx)):
            for k in range(j + 1, len(idx)):
                a.append(idx[j])
                b.append(idx[k])
    if not a:
        raise CoplError("no prompt has two usable responses; check the input")
    a, b = np.asarray(a), np.asarray(b)
    scores = comps[list(cfg.reward_models)].to_numpy()
    margins = scores[a] - scores[b]
    kept = ~((margins > 0).all(1) | (margins < 0).all(1))  # the authors' filter: ties keep a pair
    labels = break_ties(scores[a], scores[b], rng_label)
    prompt = comps["prompt_idx"].to_numpy()
    test = np.unique(prompt[comps["split"].to_numpy() == "test"])
    p = cfg.protocol
    users, pairs, proto_stats = assign_users(prompt[a], a, b, labels, p, rng_proto, margins,
                                             attributes=tuple(cfg.reward_models), kept=kept, test_prompts=test)
    responses, out_pairs = assemble(comps, pairs, list(cfg.reward_models))
    local = Path(cfg.source).expanduser()
    meta = {
        "source": "personalllm",
        "text_format": cfg.text_format,
        "annotations": p.annotations,
        "groups": [],
        "seed": cfg.seed,
        "inputs": {"personalllm": cfg.source, "personalllm_sha256": sha256(local) if local.exists() else None,
                   "reward_models": list(cfg.reward_models), "responses": list(cfg.responses),
                   "tokenizer": cfg.tokenizer, "max_tokens": cfg.max_tokens},
        "protocol": asdict(p),
        "protocol_stats": proto_stats,
        "filter_stats": stats,
    }
    return PreferenceDataset(responses, users, out_pairs, meta)
