"""Build real UF-P-2 / UF-P-4 (ALL / AVG) from UltraFeedback (paper Appendix C.1).

Inputs:
- ``openbmb/UltraFeedback``: one row per prompt (``instruction``) with four ``completions``, each
  holding a ``response`` and per-attribute ``annotations`` whose ``Rating`` is "1".."5" or "N/A";
- ``argilla/ultrafeedback-binarized-preferences-cleaned``: one binarized row per prompt, ``prompt``,
  ``chosen``, ``rejected`` (each a list of chat messages ``[{"role": "user", ...}, {"role":
  "assistant", "content": response}]``, or a plain response text). TruthfulQA-contaminated and broken
  prompts are already removed from it; UltraFeedback prompts outside it are dropped.

Either can be a local JSON / JSONL / Parquet file (or a directory of them), or a Hugging Face dataset
id read through the ``datasets`` library when it is installed and the data is cached or reachable.

Steps, as the CoPL authors' and VPL's UF-P code (``inner_join``):
- drop empty and duplicate responses and completions with an "N/A" rating (on any of the four
  attributes: the survey set is built from UF-P-4, Appendix C.1); optionally drop responses longer
  than ``max_tokens`` under a tokenizer;
- **one candidate pair per prompt**: the cleaned set's chosen/rejected row, joined by (prompt,
  response text) to the usable completions and so to their four attribute ratings. A row whose prompt
  or either response is not among the usable completions is dropped (``dropped_pairs_not_joined``),
  as are later rows repeating a prompt and rows whose chosen equals rejected. Without a cleaned set
  (``cleaned=None``, the offline fallback) each prompt is binarized as argilla did: chosen = the
  completion with the best mean of the four ratings (ties by a fair random draw), rejected = a
  uniformly random completion with a strictly lower mean; a prompt whose completions all tie gives
  no pair;
- label each pair per attribute (higher rating wins, ties by a fair coin), then the shared UF-P
  protocol (:mod:`coplctl.data.protocol`): the four-attributes-disagree filter, 10% test prompts,
  survey set, users.

Every count of what was dropped goes to ``meta["filter_stats"]`` (shown by ``coplctl data inspect``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.core.errors import CoplError, DataError
from coplctl.core.files import jsonl_records, read_json
from coplctl.data.dataset import TEXT_FORMAT, PreferenceDataset
from coplctl.data.protocol import ATTRIBUTES, ProtocolConfig, assign_users, break_ties

UF_HUB_ID = "openbmb/UltraFeedback"
CLEANED_HUB_ID = "argilla/ultrafeedback-binarized-preferences-cleaned"
HOW_TO_GET = (
    "download it where you have network access, e.g. `huggingface-cli download --repo-type dataset "
    "{id} --local-dir DIR`, and pass DIR (or one of its .parquet/.jsonl files) here"
)


@dataclass
class BuildConfig:
    """Real UF-P builder; the protocol fields are the paper's defaults."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """The UF-P user protocol (paper defaults)."""
    seed: int = 0
    """Seed of the tie coins and the user protocol."""
    ultrafeedback: str = UF_HUB_ID
    """Path of a local copy of openbmb/UltraFeedback, or its hub id."""
    cleaned: str | None = CLEANED_HUB_ID
    """Path or hub id of argilla/ultrafeedback-binarized-preferences-cleaned: its chosen/rejected row gives
    each prompt's one candidate pair (UltraFeedback prompts outside it are dropped). None is the offline
    fallback: every prompt is kept and binarized here as argilla did (chosen = best mean of the four
    ratings, ties by a fair draw; rejected = a random completion with a strictly lower mean; a prompt
    whose completions all tie gives no pair)."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local path) for the optional length filter."""
    max_tokens: int | None = None
    """Drop responses whose formatted text is longer than this many tokens (needs ``tokenizer``)."""


def input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise DataError(path, "holds no .parquet, .jsonl or .json file")
        return files
    return [path]


def read_records(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    """Yield (file, row-or-line, record) from local JSON, JSONL or Parquet files."""
    for f in input_files(path):
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f)
            except Exception as e:
                raise DataError(f, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise DataError(f, f"missing column {', '.join(missing)}")
            yield from ((f, i, r) for i, r in enumerate(table.select(list(columns)).to_pylist()))
        elif f.suffix == ".jsonl":
            yield from ((f, n, r) for n, r in jsonl_records(f))
        elif f.suffix == ".json":
            data = read_json(f, what="JSON file", expect=list)
            yield from ((f, i, r) for i, r in enumerate(data))
        else:
            raise DataError(f, "unsupported file type; use .parquet, .jsonl or .json")


def _hub_records(repo_id: str, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    ds = hub_dataset(repo_id, split="train")
    yield from ((Path(repo_id), i, r) for i, r in enumerate(ds.select_columns(list(columns))))


def looks_like_hub_id(source: str) -> bool:
    """``owner/name``: read from the hub (or its cache) when no such local path exists. A path whose first part
    is a local directory (``data/mine``) is a mistyped local path, never sent to the hub."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and \
        Path(source).suffix not in (".parquet", ".jsonl", ".json", ".csv") and not Path(source.split("/")[0]).is_dir()


def hub_dataset(source: str, config: str | None = None, *, split: str | None = None):
    """The ``datasets`` dataset (a DatasetDict, or one ``split``) of hub id ``source``, from the hub or its
    cache; a local-looking path that does not exist, a missing ``datasets`` package or a failed load is one
    clear error saying how to get a local copy."""
    if not looks_like_hub_id(source):
        raise DataError(Path(source).expanduser(), "no such file or directory (a local copy, or the hub id owner/name)")
    how = "; or " + HOW_TO_GET.format(id=source)
    try:
        import datasets
    except ImportError:
        raise CoplError(f"{source} is not a local path, and reading it from the hub needs the `datasets` "
                        f"package (pip install 'coplctl[hub]')" + how) from None
    try:
        return datasets.load_dataset(source, config, split=split)
    except Exception as e:
        what = ", ".join(f"{k} {v}" for k, v in (("config", config), ("split", split)) if v)
        raise CoplError(f"could not load {source}" + (f" ({what})" if what else "") +
                        f" from the Hugging Face hub or its cache ({type(e).__name__})" + how) from None


def read_source(source: str, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    path = Path(source).expanduser()
    if path.exists():
        return read_records(path, columns)
    if looks_like_hub_id(source):
        return _hub_records(source, columns)
    raise DataError(path, "no such file or directory")


def _rating(value, where: tuple[Path, int], is_line: bool) -> float:
    """A 1-5 rating, or NaN for "N/A" / missing."""
    if value is None or (isinstance(value, str) and value.strip().upper() in ("N/A", "NA", "")):
        return np.nan
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = -1.0
    if not 1 <= r <= 5:
        f, n = where
        raise DataError(f, f"rating {value!r} is neither 1-5 nor N/A",
                        **({"line": n} if is_line else {"row": n}))
    return r


def location(f: Path, n: int) -> dict:
    return {"line": n} if f.suffix == ".jsonl" else {"row": n}


def _response_text(value, column: str, f: Path, n: int) -> str:
    """The response of a cleaned-set ``chosen`` / ``rejected`` cell: a plain text, or the content of the
    last assistant message of a chat-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        for m in reversed(value):
            if m.get("role") == "assistant":
                if isinstance(m.get("content"), str):
                    return m["content"]
                break
        raise DataError(f, f"field {column} has no assistant message with a text content", **location(f, n))
    raise DataError(f, f"field {column} must be a response text or a list of chat messages "
                       f"(role, content), not {type(value).__name__}", **location(f, n))


def _read_cleaned(source: str, stats: dict) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """The cleaned set's binarized rows: {prompt: (chosen text, rejected text)}, and every prompt it holds."""
    rows, prompts = {}, set()
    for f, n, rec in read_source(source, ("prompt", "chosen", "rejected")):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise DataError(f, "missing or non-text field prompt", **location(f, n))
        for column in ("chosen", "rejected"):
            if column not in rec:
                raise DataError(f, f"missing field {column}", **location(f, n))
        chosen = _response_text(rec["chosen"], "chosen", f, n)
        rejected = _response_text(rec["rejected"], "rejected", f, n)
        prompt = rec["prompt"]
        stats["cleaned_rows"] += 1
        if prompt in prompts:
            stats["dropped_duplicate_cleaned_prompts"] += 1
            continue
        prompts.add(prompt)
        if chosen == rejected:
            stats["dropped_chosen_equals_rejected"] += 1
            continue
        rows[prompt] = (chosen, rejected)
    return rows, prompts


def _load_completions(cfg: BuildConfig, stats: dict, keep: set[str] | None) -> pd.DataFrame:
    """One row per usable completion: prompt, response text, four ratings (prompts in file order)."""
    rows, seen_prompts = [], set()
    for f, n, rec in read_source(cfg.ultrafeedback, ("instruction", "completions")):
        loc = location(f, n)
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise DataError(f, "missing or non-text field instruction", **loc)
        comps = rec.get("completions")
        if not isinstance(comps, list):
            raise DataError(f, "missing field completions (a list of rated responses)", **loc)
        prompt = rec["instruction"]
        stats["ultrafeedback_prompts"] += 1
        if keep is not None and prompt not in keep:
            stats["dropped_prompts_not_in_cleaned"] += 1
            continue
        if prompt in seen_prompts:
            stats["dropped_duplicate_prompts"] += 1
            continue
        seen_prompts.add(prompt)
        texts = set()
        for c in comps:
            if not isinstance(c, dict) or not isinstance(c.get("annotations"), dict):
                raise DataError(f, "a completion lacks its annotations", **loc)
            text = c.get("response")
            if not isinstance(text, str) or not text.strip():
                stats["dropped_empty_responses"] += 1
                continue
            if text in texts:
                stats["dropped_duplicate_responses"] += 1
                continue
            ann = c["annotations"]
            ratings = [_rating((ann.get(a) or {}).get("Rating") if isinstance(ann.get(a), dict) else None,
                               (f, n), f.suffix == ".jsonl") for a in ATTRIBUTES]
            if any(np.isnan(r) for r in ratings):
                stats["dropped_na_ratings"] += 1
                continue
            texts.add(text)
            rows.append((prompt, text, *ratings))
    return pd.DataFrame(rows, columns=["prompt", "text", *ATTRIBUTES])


def _join(comps: pd.DataFrame, cleaned: dict[str, tuple[str, str]], stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Join each cleaned row to the usable completions by (prompt, response text): (chosen, rejected)
    completion indices, one pair per prompt, in UltraFeedback's prompt order."""
    index = {key: i for i, key in enumerate(zip(comps["prompt"], comps["text"]))}
    pairs = []
    for prompt, (chosen, rejected) in cleaned.items():
        a, b = index.get((prompt, chosen)), index.get((prompt, rejected))
        if a is None or b is None:
            stats["dropped_pairs_not_joined"] += 1
            continue
        pairs.append((a, b))
    pairs.sort()
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def _binarize(comps: pd.DataFrame, rng: np.random.Generator, stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Offline fallback, argilla's binarization: chosen = the completion with the best mean of the four
    ratings (ties by a fair draw), rejected = a uniformly random completion with a strictly lower mean."""
    mean = comps[list(ATTRIBUTES)].to_numpy().mean(axis=1)
    a, b = [], []
    for idx in comps.groupby("prompt_idx", sort=True).indices.values():
        if len(idx) < 2:
            stats["dropped_prompts_one_completion"] += 1
            continue
        m = mean[idx]
        top, lower = idx[m == m.max()], idx[m < m.max()]
        if not len(lower):
            stats["dropped_tied_prompts"] += 1
            continue
        a.append(rng.choice(top))
        b.append(rng.choice(lower))
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def length_filter(comps: pd.DataFrame, cfg, stats: dict) -> pd.DataFrame:
    """Drop responses longer than ``cfg.max_tokens`` under ``cfg.tokenizer`` (prompt + response, formatted)."""
    if cfg.max_tokens is None:
        return comps
    if not cfg.tokenizer:
        raise CoplError("--max-tokens needs --tokenizer (a hub id or local path of the backbone's tokenizer)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:
        raise CoplError(f"could not load tokenizer {cfg.tokenizer!r} ({type(e).__name__}: {e})") from None
    texts = [TEXT_FORMAT.format(prompt=p, response=r) for p, r in zip(comps["prompt"], comps["text"])]
    lengths = np.array([len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]])
    ok = lengths <= cfg.max_tokens
    stats["dropped_too_long"] = int((~ok).sum())
    return comps[ok].reset_index(drop=True)


def sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in input_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def assemble(comps: pd.DataFrame, pairs: pd.DataFrame, scores: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The responses the protocol used (ids r0..., with their ``scores`` columns) and the pairs by id."""
    used = np.unique(np.concatenate([pairs["chosen"].to_numpy(), pairs["rejected"].to_numpy()]))
    width = len(str(len(used) - 1))
    rid = np.full(len(comps), "", dtype=object)
    rid[used] = [f"r{i:0{width}d}" for i in range(len(used))]
    responses = comps.iloc[used].reset_index(drop=True)
    responses.insert(0, "response_id", rid[used])
    responses = responses[["response_id", "prompt", "text", *scores]]
    out_pairs = pd.DataFrame({
        "user_id": pairs["user_id"],
        "chosen_id": rid[pairs["chosen"].to_numpy()].astype(str),
        "rejected_id": rid[pairs["rejected"].to_numpy()].astype(str),
        "split": pairs["split"],
        "controversial": pairs["controversial"],
    })
    return responses, out_pairs


def build_ufp(cfg: BuildConfig) -> PreferenceDataset:
    """Build UF-P from UltraFeedback (see module docstring): one candidate pair per prompt, the cleaned
    set's chosen/rejected row joined to the four ratings, or, with ``cfg.cleaned=None``, argilla's
    binarization done here (best mean rating vs a random strictly worse completion)."""
    p = cfg.protocol
    stats = {k: 0 for k in ("ultrafeedback_prompts", "dropped_prompts_not_in_cleaned", "dropped_duplicate_prompts",
                            "dropped_empty_responses", "dropped_duplicate_responses", "dropped_na_ratings")}
    ss = np.random.SeedSequence(cfg.seed)
    rng_label, rng_proto, rng_binarize = (np.random.default_rng(s) for s in ss.spawn(3))
    cleaned, keep = None, None
    if cfg.cleaned:
        stats.update(cleaned_rows=0, dropped_duplicate_cleaned_prompts=0, dropped_chosen_equals_rejected=0)
        cleaned, keep = _read_cleaned(cfg.cleaned, stats)
    comps = length_filter(_load_completions(cfg, stats, keep), cfg, stats)
    comps["prompt_idx"] = pd.factorize(comps["prompt"])[0]
    # Candidate pairs: one per prompt, the cleaned set's chosen/rejected row (or argilla's rule offline).
    if cleaned is not None:
        stats["dropped_pairs_not_joined"] = 0
        a, b = _join(comps, cleaned, stats)
    else:
        stats.update(dropped_prompts_one_completion=0, dropped_tied_prompts=0)
        a, b = _binarize(comps, rng_binarize, stats)
    if not len(a):
        raise CoplError("no candidate pair is left after filtering and "
                        + ("joining the cleaned set to UltraFeedback" if cleaned is not None else "binarizing")
                        + "; check the inputs")
    ratings = comps[list(ATTRIBUTES)].to_numpy()
    labels = break_ties(ratings[a], ratings[b], rng_label)
    users, pairs, proto_stats = assign_users(comps["prompt_idx"].to_numpy()[a], a, b, labels, p, rng_proto,
                                             ratings[a] - ratings[b])

    for attr in ATTRIBUTES:
        comps[attr] = comps[attr].astype("Int8")
    responses, out_pairs = assemble(comps, pairs, list(ATTRIBUTES))
    if p.survey_pairs and proto_stats["survey_pairs"] < p.survey_pairs:
        stats["warning"] = (f"only {proto_stats['survey_pairs']} survey pairs were available "
                            f"(asked for {p.survey_pairs})")
    meta = {
        "source": "ultrafeedback",
        "variant": p.variant,
        "annotations": p.annotations,
        "groups": list(p.groups) if p.preferences == "groups" else [],
        "seed": cfg.seed,
        "binarization": "cleaned" if cleaned is not None else "best-mean (offline fallback)",
        "inputs": {"ultrafeedback": cfg.ultrafeedback, "ultrafeedback_sha256": sha256(Path(cfg.ultrafeedback)),
                   "cleaned": cfg.cleaned,
                   "cleaned_sha256": sha256(Path(cfg.cleaned)) if cfg.cleaned else None,
                   "tokenizer": cfg.tokenizer, "max_tokens": cfg.max_tokens},
        "protocol": asdict(p),
        "protocol_stats": proto_stats,
        "filter_stats": stats,
    }
    return PreferenceDataset(responses, users, out_pairs, meta)
