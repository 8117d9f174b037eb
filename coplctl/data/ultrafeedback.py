"""Build real UF-P-2 / UF-P-4 (ALL / AVG) from UltraFeedback (paper Appendix C.1).

Inputs:
- ``openbmb/UltraFeedback``: one row per prompt (``instruction``) with four ``completions``, each
  holding a ``response`` and per-attribute ``annotations`` whose ``Rating`` is "1".."5" or "N/A";
- ``argilla/ultrafeedback-binarized-preferences-cleaned``: its ``prompt`` column is the cleaned prompt
  set (TruthfulQA contamination and broken rows removed); UltraFeedback prompts outside it are dropped.

Either can be a local JSON / JSONL / Parquet file (or a directory of them), or a Hugging Face dataset
id read through the ``datasets`` library when it is installed and the data is cached or reachable.

Steps: drop empty responses and completions with an "N/A" rating (on any of the four attributes: the
survey set is built from UF-P-4, Appendix C.1); optionally drop responses longer than ``max_tokens``
under a tokenizer; label every pair of completions of a prompt per attribute (higher rating wins,
ties by a fair coin); then the shared UF-P protocol (:mod:`coplctl.data.protocol`): survey set,
10% test prompts, users.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coplctl.data.dataset import TEXT_FORMAT, PreferenceDataset
from coplctl.data.protocol import ATTRIBUTES, ProtocolConfig, assign_users, break_ties
from coplctl.errors import CoplError, DataError

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
    """Path or hub id of argilla/ultrafeedback-binarized-preferences-cleaned; None skips the prompt filter."""
    tokenizer: str | None = None
    """Tokenizer (hub id or local path) for the optional length filter."""
    max_tokens: int | None = None
    """Drop responses whose formatted text is longer than this many tokens (needs ``tokenizer``)."""


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise DataError(path, "holds no .parquet, .jsonl or .json file")
        return files
    return [path]


def _records(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    """Yield (file, row-or-line, record) from local JSON, JSONL or Parquet files."""
    for f in _files(path):
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
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            yield f, n, json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f, f"invalid JSON ({e.msg})", line=n) from None
        elif f.suffix == ".json":
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f, f"invalid JSON ({e.msg})", line=e.lineno) from None
            if not isinstance(data, list):
                raise DataError(f, "a .json input must hold a list of records (use .jsonl for one per line)")
            yield from ((f, i, r) for i, r in enumerate(data))
        else:
            raise DataError(f, "unsupported file type; use .parquet, .jsonl or .json")


def _hub_records(repo_id: str, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    try:
        import datasets
    except ImportError:
        raise CoplError(f"{repo_id} is not a local path, and reading it from the hub needs the `datasets` "
                        f"package (pip install 'coplctl[hub]'); or " + HOW_TO_GET.format(id=repo_id)) from None
    try:
        ds = datasets.load_dataset(repo_id, split="train")
    except Exception as e:
        raise CoplError(f"could not load {repo_id} from the Hugging Face hub or its cache "
                        f"({type(e).__name__}); " + HOW_TO_GET.format(id=repo_id)) from None
    yield from ((Path(repo_id), i, r) for i, r in enumerate(ds.select_columns(list(columns))))


def read_source(source: str, columns: tuple[str, ...]) -> Iterator[tuple[Path, int, dict]]:
    path = Path(source).expanduser()
    if path.exists():
        return _records(path, columns)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
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


def _load_completions(cfg: BuildConfig, stats: dict) -> pd.DataFrame:
    """One row per usable completion: prompt index, prompt, response text, four ratings."""
    keep = None
    if cfg.cleaned:
        keep = set()
        for f, n, rec in read_source(cfg.cleaned, ("prompt",)):
            prompt = rec.get("prompt") if isinstance(rec, dict) else None
            if not isinstance(prompt, str):
                raise DataError(f, "missing or non-text field prompt",
                                **({"line": n} if f.suffix == ".jsonl" else {"row": n}))
            keep.add(prompt)
    rows, seen_prompts = [], set()
    for f, n, rec in read_source(cfg.ultrafeedback, ("instruction", "completions")):
        loc = {"line": n} if f.suffix == ".jsonl" else {"row": n}
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


def _length_filter(comps: pd.DataFrame, cfg: BuildConfig, stats: dict) -> pd.DataFrame:
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


def _sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in _files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build_ufp(cfg: BuildConfig) -> PreferenceDataset:
    """Build UF-P from UltraFeedback (see module docstring)."""
    p = cfg.protocol
    stats = {k: 0 for k in ("ultrafeedback_prompts", "dropped_prompts_not_in_cleaned", "dropped_duplicate_prompts",
                            "dropped_empty_responses", "dropped_duplicate_responses", "dropped_na_ratings")}
    comps = _length_filter(_load_completions(cfg, stats), cfg, stats)
    comps["prompt_idx"] = pd.factorize(comps["prompt"])[0]
    # Candidate pairs: every pair of usable completions of the same prompt.
    a_list, b_list = [], []
    for idx in comps.groupby("prompt_idx", sort=True).indices.values():
        if len(idx) >= 2:
            i, j = np.triu_indices(len(idx), k=1)
            a_list.append(idx[i])
            b_list.append(idx[j])
    if not a_list:
        raise CoplError("no prompt has two usable completions after filtering; check the inputs")
    a, b = np.concatenate(a_list), np.concatenate(b_list)
    ss = np.random.SeedSequence(cfg.seed)
    rng_label, rng_proto = (np.random.default_rng(s) for s in ss.spawn(2))
    ratings = comps[list(ATTRIBUTES)].to_numpy()
    labels = break_ties(ratings[a], ratings[b], rng_label)
    users, pairs, proto_stats = assign_users(comps["prompt_idx"].to_numpy()[a], a, b, labels, p, rng_proto)

    used = np.unique(np.concatenate([pairs["chosen"].to_numpy(), pairs["rejected"].to_numpy()]))
    width = len(str(len(used) - 1))
    rid = np.full(len(comps), "", dtype=object)
    rid[used] = [f"r{i:0{width}d}" for i in range(len(used))]
    responses = comps.iloc[used].reset_index(drop=True)
    responses.insert(0, "response_id", rid[used])
    for attr in ATTRIBUTES:
        responses[attr] = responses[attr].astype("Int8")
    responses = responses[["response_id", "prompt", "text", *ATTRIBUTES]]
    out_pairs = pd.DataFrame({
        "user_id": pairs["user_id"],
        "chosen_id": rid[pairs["chosen"].to_numpy()].astype(str),
        "rejected_id": rid[pairs["rejected"].to_numpy()].astype(str),
        "split": pairs["split"],
        "controversial": pairs["controversial"],
    })
    if p.survey_pairs and proto_stats["survey_pairs"] < p.survey_pairs:
        stats["warning"] = (f"only {proto_stats['survey_pairs']} survey pairs were available "
                            f"(asked for {p.survey_pairs})")
    meta = {
        "source": "ultrafeedback",
        "variant": p.variant,
        "annotations": p.annotations,
        "groups": list(p.groups),
        "seed": cfg.seed,
        "inputs": {"ultrafeedback": cfg.ultrafeedback, "ultrafeedback_sha256": _sha256(Path(cfg.ultrafeedback)),
                   "cleaned": cfg.cleaned,
                   "cleaned_sha256": _sha256(Path(cfg.cleaned)) if cfg.cleaned else None,
                   "tokenizer": cfg.tokenizer, "max_tokens": cfg.max_tokens},
        "protocol": asdict(p),
        "protocol_stats": proto_stats,
        "filter_stats": stats,
    }
    return PreferenceDataset(responses, users, out_pairs, meta)
