"""`coplctl data ...`: simulate, build and inspect preference datasets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import DataDir, Force, Json, MaybeOut, Seed, err, examples, out, print_json
from coplctl.core.errors import CoplError

app = typer.Typer(name="data", help="Create, import and inspect preference datasets (UF-P simulated or real, or your own table).",
                  no_args_is_help=True,
                  epilog=examples("coplctl data simulate --variant uf-p-2 --annotations all --users 1000",
                                  "coplctl data build-ufp --ultrafeedback uf.parquet --cleaned cleaned.parquet",
                                  "coplctl data inspect data/sim-uf-p-2-all"))


class Variant(str, Enum):
    ufp2 = "uf-p-2"
    ufp4 = "uf-p-4"
    tldr = "tldr"


class Annotations(str, Enum):
    all = "all"
    avg = "avg"


VariantOpt = Annotated[Variant, typer.Option("--variant", help=(
    "uf-p-2: helpfulness vs honesty; uf-p-4: all four attributes; tldr (simulate only): the TL;DR twin, "
    "shorter vs longer summaries."))]
AnnotationsOpt = Annotated[Annotations, typer.Option(
    "--annotations", help="all: exactly 8 (UF-P-2) / 16 (UF-P-4) annotations per user; avg: uniform 1-15 / 1-31.")]
UsersOpt = Annotated[int, typer.Option("--users", min=1, help="Seen users, split evenly across groups (paper: 10,000).")]
UnseenOpt = Annotated[int, typer.Option("--unseen-users", min=0, help="Unseen users for adaptation (paper: 100).")]
SurveyOpt = Annotated[int, typer.Option("--survey-pairs", min=0,
                                        help="Pairs in the survey set (the four attributes disagree; paper: 25,993; 0 = all).")]
FewshotOpt = Annotated[Optional[int], typer.Option("--fewshot-pairs", min=1, show_default="8 / 16",
                                                   help="Few-shot pairs per unseen user.")]
ValidOpt = Annotated[int, typer.Option("--valid-pairs", min=0, help=(
    "Annotations of each seen user held out for validation (authors: 1; ALL: always, AVG: when the user "
    "has at least 8 / 16)."))]

ValidPromptsOpt = Annotated[float, typer.Option("--valid-prompt-fraction", min=0.0, max=0.9, help=(
    "Share of prompts held out for the valid pairs, so that validation mirrors the test pairs (not in the "
    "paper; 0 = the authors': valid pairs come from the survey that others train on)."))]


class Preferences(str, Enum):
    groups = "groups"
    mixture = "mixture"


PreferencesOpt = Annotated[Preferences, typer.Option("--preferences", help=(
    "groups: each user has one group and labels by its attribute (UF-P); mixture: each user has Dirichlet "
    "weights over the attributes and labels by the weighted rating (PersonalLLM-style, no groups)."))]
AlphaOpt = Annotated[float, typer.Option("--alpha", min=1e-6, help="Dirichlet concentration of mixture users' weights (PersonalLLM: 0.1).")]


TokenizerOpt = Annotated[Optional[str], typer.Option("--tokenizer", help="Tokenizer for the length filter.")]
MaxTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-tokens", min=1, help="Drop responses longer than this (prompt + response, formatted; authors: 1024).")]
FewshotPairsOpt = Annotated[int, typer.Option("--fewshot-pairs", min=1, help="Few-shot pairs per unseen user.")]
TestPairsOpt = Annotated[int, typer.Option("--test-pairs", min=1, help="Test pairs per seen user (the authors' "
                                           "generator draws 100; their reward-model script evaluates about 10).")]
TextFormatOpt = Annotated[Optional[str], typer.Option(
    "--text-format", help="How backbones read a pair, with {prompt} and {response} [default: the authors' format "
    "for this data].", show_default=False)]
UnseenTestPairsOpt = Annotated[int, typer.Option("--unseen-test-pairs", min=1, help="Test pairs per unseen user.")]


def _protocol(variant, annotations, users, unseen_users, survey_pairs, fewshot_pairs, valid_pairs,
              valid_prompt_fraction, preferences, alpha):
    from coplctl.data.protocol import ProtocolConfig

    return ProtocolConfig(variant=variant.value, annotations=annotations.value, users=users,
                          unseen_users=unseen_users, survey_pairs=survey_pairs, fewshot_pairs=fewshot_pairs,
                          valid_pairs=valid_pairs, valid_prompt_fraction=valid_prompt_fraction,
                          preferences=preferences.value, alpha=alpha)


def _build(path: Path, inputs: dict[str, str], status: str, make, *, force: bool, as_json: bool,
           note_dropped: bool = False) -> None:
    """What every data command does around its builder ``make`` (a callable returning the dataset): refuse
    an output over one of its ``inputs`` ({what: path}), refuse an existing dataset without --force (before
    any work), build under a status line, save atomically, then say what was written (and warn)."""
    from coplctl.core.atomic import check_output, refuse_overlap

    refuse_overlap(path, inputs)
    check_output(path, force=force, marker="meta.json", kind="dataset")
    with err.status(status):
        ds = make()
        ds.save(path, overwrite=force)
    stats = ds.meta.get("filter_stats") or {}
    if stats.get("warning"):
        err.print(f"warning: {stats['warning']}", style="yellow")
    dropped = {k: v for k, v in stats.items() if k.startswith("dropped") and v} if note_dropped else {}
    if dropped:
        err.print("note: " + ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in dropped.items()), style="yellow")
    empty = [k for k, v in ds.meta["counts"]["pairs"].items() if v == 0 and k in ("train", "valid", "test")]
    if empty:  # e.g. --valid-pairs larger than any user's judgements: a split that selects or scores nothing
        err.print(f"note: the {', '.join(empty)} split(s) of {path} hold no pairs; check the split options "
                  f"(coplctl data inspect {path})", style="yellow", highlight=False, soft_wrap=True)
    _report(ds, path, as_json)


def _report(ds, path: Path, as_json: bool = False) -> None:
    """What a build wrote, on stderr; with --json also its path, counts and dropped counts on stdout."""
    c = ds.meta["counts"]
    err.print(f"wrote {path}: {c['responses']:,} responses, {c['users']['seen']:,} seen + "
              f"{c['users']['unseen']:,} unseen users, " + ", ".join(f"{v:,} {k}" for k, v in c["pairs"].items())
              + f" pairs. Next: coplctl data inspect {path}", highlight=False, soft_wrap=True)
    if as_json:
        stats = ds.meta.get("filter_stats") or {}
        stages = {**stats, **(ds.meta.get("protocol_stats") or {})}
        print_json({"path": str(path), "counts": c, "dropped": {k: v for k, v in stages.items() if k.startswith("dropped")},
                    "warning": stats.get("warning")})


@app.command("simulate", epilog=examples(
    "coplctl data simulate --variant uf-p-4 --annotations avg --out data/uf-p-4-avg",
    "coplctl data simulate --variant uf-p-2 --annotations all --users 1000 --unseen-users 20 --seed 1",
    "coplctl data simulate --variant uf-p-4 --annotations all --preferences mixture --alpha 0.1"))
def simulate(
    variant: VariantOpt = Variant.ufp4,
    annotations: AnnotationsOpt = Annotations.avg,
    users: UsersOpt = 10_000,
    unseen_users: UnseenOpt = 100,
    survey_pairs: SurveyOpt = 25_993,
    fewshot_pairs: FewshotOpt = None,
    valid_pairs: ValidOpt = 1,
    valid_prompt_fraction: ValidPromptsOpt = 0.0,
    preferences: PreferencesOpt = Preferences.groups,
    alpha: AlphaOpt = 0.1,
    cue_fidelity: Annotated[float, typer.Option(
        "--cue-fidelity", min=0.0, max=1.0, help="Chance that a text cue shows the true attribute level.")] = 0.75,
    seed: Seed = 0,
    out_dir: MaybeOut = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Generate a simulated UF-P dataset (same protocol and statistics as the real one, offline).

    The dataset directory is --out (default: data/sim-VARIANT-ANNOTATIONS).
    """
    from coplctl.data.simulate import SimConfig
    from coplctl.data.simulate import simulate as run

    proto = _protocol(variant, annotations, users, unseen_users, survey_pairs, fewshot_pairs, valid_pairs,
                      valid_prompt_fraction, preferences, alpha)
    mix = "-mixture" if preferences is Preferences.mixture else ""
    path = out_dir or Path("data") / f"sim-{variant.value}-{annotations.value}{mix}"
    _build(path, {}, "simulating UF-P ...", lambda: run(SimConfig(protocol=proto, seed=seed, cue_fidelity=cue_fidelity)),
           force=force, as_json=as_json)


@app.command("build-ufp", epilog=examples(
    "coplctl data build-ufp --ultrafeedback ~/data/UltraFeedback --cleaned ~/data/uf-cleaned --out data/uf-p-4-avg",
    "coplctl data build-ufp --variant uf-p-2 --annotations all --tokenizer google/gemma-2b-it --max-tokens 1024"))
def build_ufp(
    variant: VariantOpt = Variant.ufp4,
    annotations: AnnotationsOpt = Annotations.avg,
    ultrafeedback: Annotated[str, typer.Option(
        "--ultrafeedback", help="Local JSON/JSONL/Parquet copy (file or directory) of openbmb/UltraFeedback, or the hub id.")]
    = "openbmb/UltraFeedback",
    cleaned: Annotated[str, typer.Option(
        "--cleaned", help="argilla/ultrafeedback-binarized-preferences-cleaned (path or hub id): its chosen/rejected "
                          "row is each prompt's one candidate pair (other prompts are dropped); 'none' keeps every "
                          "prompt and binarizes it here (best mean rating vs a random worse completion).")] = "argilla/ultrafeedback-binarized-preferences-cleaned",
    tokenizer: TokenizerOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", min=1, help="Drop responses longer than this (prompt + response, formatted).")] = None,
    users: UsersOpt = 10_000,
    unseen_users: UnseenOpt = 100,
    survey_pairs: SurveyOpt = 25_993,
    fewshot_pairs: FewshotOpt = None,
    valid_pairs: ValidOpt = 1,
    valid_prompt_fraction: ValidPromptsOpt = 0.0,
    preferences: PreferencesOpt = Preferences.groups,
    alpha: AlphaOpt = 0.1,
    seed: Seed = 0,
    out_dir: MaybeOut = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Build real UF-P from UltraFeedback ratings (one cleaned chosen/rejected pair per prompt, per-attribute
    labels, fair-coin ties, four-attributes-disagree filter).

    The dataset directory is --out (default: data/ufp-VARIANT-ANNOTATIONS).
    """
    from coplctl.data.ultrafeedback import BuildConfig
    from coplctl.data.ultrafeedback import build_ufp as run

    if variant is Variant.tldr:
        raise CoplError("--variant tldr is not UltraFeedback: build TL;DR with coplctl data build-tldr")
    proto = _protocol(variant, annotations, users, unseen_users, survey_pairs, fewshot_pairs, valid_pairs,
                      valid_prompt_fraction, preferences, alpha)
    path = out_dir or Path("data") / f"ufp-{variant.value}-{annotations.value}"
    cfg = BuildConfig(protocol=proto, seed=seed, ultrafeedback=ultrafeedback,
                      cleaned=None if cleaned.lower() == "none" else cleaned,
                      tokenizer=tokenizer, max_tokens=max_tokens)
    _build(path, {"the UltraFeedback copy": ultrafeedback, "the cleaned set": cleaned},
           "building UF-P from UltraFeedback ...", lambda: run(cfg), force=force, as_json=as_json)


@app.command("build-personalllm", epilog=examples(
    "coplctl data build-personalllm --personalllm ~/data/PersonalLLM --out data/personalllm-all",
    "coplctl data build-personalllm --annotations avg --tokenizer google/gemma-2b-it --max-tokens 1024"))
def build_personalllm(
    annotations: AnnotationsOpt = Annotations.all,
    personalllm: Annotated[str, typer.Option(
        "--personalllm", help="Local copy of namkoong-lab/PersonalLLM (a directory of train*/test* Parquet or JSONL "
                              "files), or the hub id.")] = "namkoong-lab/PersonalLLM",
    reward_models: Annotated[str, typer.Option(
        "--reward-models", help="Comma-separated reward models the users mix (the authors' four).")]
    = "gemma_7b,mistral_weqweasdas,llama3_sfairx,oasst_deberta_v3",
    alpha: AlphaOpt = 0.1,
    tokenizer: TokenizerOpt = None,
    text_format: TextFormatOpt = None,
    max_tokens: MaxTokensOpt = None,
    users: UsersOpt = 10_000,
    unseen_users: UnseenOpt = 100,
    fewshot_pairs: FewshotPairsOpt = 16,
    test_pairs: TestPairsOpt = 100,
    unseen_test_pairs: UnseenTestPairsOpt = 50,
    valid_prompt_fraction: ValidPromptsOpt = 0.0,
    seed: Seed = 0,
    out_dir: MaybeOut = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Build PersonalLLM preference data as the CoPL authors do: responses 5-7 of each prompt, pairs the
    reward models do not all order alike, users mixing the reward models with Dirichlet weights.

    The dataset directory is --out (default: data/personalllm-ANNOTATIONS).
    """
    from coplctl.data.personalllm import PersonalLLMConfig, plm_protocol
    from coplctl.data.personalllm import build_personalllm as run

    proto = plm_protocol(annotations=annotations.value, users=users, unseen_users=unseen_users, alpha=alpha,
                         fewshot_pairs=fewshot_pairs, test_pairs=test_pairs, unseen_test_pairs=unseen_test_pairs,
                         valid_prompt_fraction=valid_prompt_fraction)
    path = out_dir or Path("data") / f"personalllm-{annotations.value}"
    models = tuple(m.strip() for m in reward_models.split(",") if m.strip())
    cfg = PersonalLLMConfig(protocol=proto, seed=seed, source=personalllm, reward_models=models,
                            tokenizer=tokenizer, max_tokens=max_tokens,
                            **({"text_format": text_format} if text_format is not None else {}))
    _build(path, {"the PersonalLLM copy": personalllm}, "building PersonalLLM preference data ...", lambda: run(cfg),
           force=force, as_json=as_json)


@app.command("build-tldr", epilog=examples(
    "coplctl data build-tldr --tldr ~/data/summarize_from_feedback/comparisons --out data/tldr-all",
    "coplctl data build-tldr --annotations avg --tokenizer google/gemma-2b-it --max-tokens 1024"))
def build_tldr(
    annotations: Annotated[Annotations, typer.Option(
        "--annotations", help="all: exactly 8 annotations per user; avg: uniform 1-15.")] = Annotations.all,
    tldr: Annotated[str, typer.Option(
        "--tldr", help="Local copy of openai/summarize_from_feedback's comparisons (a directory of train*/valid* "
                       "Parquet or JSONL files, or files whose rows carry split), or the hub id.")]
    = "openai/summarize_from_feedback",
    workers: Annotated[int, typer.Option("--workers", min=1, help="Labellers kept, those with the most comparisons (authors: 10).")] = 10,
    tokenizer: TokenizerOpt = None,
    text_format: TextFormatOpt = None,
    max_tokens: MaxTokensOpt = None,
    users: UsersOpt = 10_000,
    unseen_users: UnseenOpt = 100,
    fewshot_pairs: FewshotPairsOpt = 8,
    test_pairs: TestPairsOpt = 100,
    unseen_test_pairs: UnseenTestPairsOpt = 50,
    seed: Seed = 0,
    out_dir: MaybeOut = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Build Reddit TL;DR preference data as the CoPL authors do: supervised-policy summaries compared by the
    ten busiest labellers, users in two groups preferring the shorter or the longer summary.

    The dataset directory is --out (default: data/tldr-ANNOTATIONS).
    """
    from coplctl.data.tldr import TldrConfig, tldr_protocol
    from coplctl.data.tldr import build_tldr as run

    proto = tldr_protocol(annotations=annotations.value, users=users, unseen_users=unseen_users,
                          fewshot_pairs=fewshot_pairs, test_pairs=test_pairs, unseen_test_pairs=unseen_test_pairs)
    path = out_dir or Path("data") / f"tldr-{annotations.value}"
    cfg = TldrConfig(protocol=proto, seed=seed, source=tldr, workers=workers, tokenizer=tokenizer, max_tokens=max_tokens,
                     **({"text_format": text_format} if text_format is not None else {}))
    _build(path, {"the TL;DR copy": tldr}, "building TL;DR preference data ...", lambda: run(cfg), force=force,
           as_json=as_json)


@app.command("import", epilog=examples(
    "coplctl data import judgements.jsonl --out data/mine",
    "coplctl data import prefs.csv --user-column annotator --group-column persona --unseen-users 20 --out data/mine",
    "coplctl data import my-org/my-judgements --out data/hub   # a hub dataset with a user column (the hub extra)"))
def import_(
    source: Annotated[str, typer.Argument(metavar="FILE_OR_HUB_ID", show_default=False, help=(
        "A flat table, one row per judgement: .jsonl, .json, .csv or .parquet, or a Hugging Face dataset id "
        "(needs the hub extra)."))],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="The dataset directory to write.")],
    user_column: Annotated[str, typer.Option("--user-column", help="Column of the user id.")] = "user",
    prompt_column: Annotated[str, typer.Option("--prompt-column", help=(
        "Column of the prompt (text or chat messages); without it, chat-format chosen cells carry it."))] = "prompt",
    chosen_column: Annotated[str, typer.Option("--chosen-column", help="Column of the preferred response.")] = "chosen",
    rejected_column: Annotated[str, typer.Option("--rejected-column", help="Column of the other response.")] = "rejected",
    group_column: Annotated[Optional[str], typer.Option(
        "--group-column", show_default="group, if present", help="Column of the user's preference group.")] = None,
    split_column: Annotated[Optional[str], typer.Option(
        "--split-column", show_default="split, if present",
        help="Column of train/valid/test/fewshot per row (users with fewshot rows are unseen); else the options below.")] = None,
    controversial_column: Annotated[Optional[str], typer.Option(
        "--controversial-column", show_default="controversial, if present",
        help="Column of true/false per row; else groups whose majorities disagree on the pair.")] = None,
    test_prompt_fraction: Annotated[float, typer.Option(
        "--test-prompt-fraction", min=0.0, max=0.9, help="Share of prompts held out as test pairs (paper: 0.1).")] = 0.1,
    valid_prompt_fraction: ValidPromptsOpt = 0.0,
    valid_pairs: Annotated[int, typer.Option(
        "--valid-pairs", min=0, help="Judgements of each seen user held out for validation (authors: 1).")] = 1,
    unseen_users: Annotated[int, typer.Option(
        "--unseen-users", min=0, help="Users held out as unseen, adapted from their few-shot pairs.")] = 0,
    fewshot_pairs: FewshotPairsOpt = 8,
    hub_split: Annotated[str, typer.Option("--hub-split", help="Split of a hub dataset to read.")] = "train",
    seed: Seed = 0,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Import a flat preference table (one row per judgement: user, prompt, chosen, rejected, maybe a group)
    as a dataset directory: responses deduplicated by (prompt, text), splits by the UF-P protocol's options
    or a split column, every bad row named by its line."""
    from coplctl.data.importer import ImportConfig, import_table

    explicit = tuple(c for c in (group_column, split_column, controversial_column) if c is not None)
    cfg = ImportConfig(user_column=user_column, prompt_column=prompt_column, chosen_column=chosen_column,
                       rejected_column=rejected_column, group_column=group_column or "group",
                       split_column=split_column or "split", controversial_column=controversial_column or "controversial",
                       test_prompt_fraction=test_prompt_fraction, valid_prompt_fraction=valid_prompt_fraction,
                       valid_pairs=valid_pairs, unseen_users=unseen_users, fewshot_pairs=fewshot_pairs,
                       seed=seed, hub_split=hub_split, required=explicit)
    _build(out_dir, {"the input table": source}, f"importing {source} ...", lambda: import_table(source, cfg),
           force=force, as_json=as_json, note_dropped=True)


BackboneOpt = Annotated[Optional[str], typer.Option(
    "--backbone", help="Also count the texts this backbone cuts to its length limit (its tokenizer only).")]
MaxLengthOpt = Annotated[Optional[int], typer.Option(
    "--max-length", min=1, help="Tokens per formatted text (default: the backbone's own limit).")]


@app.command("inspect", epilog=examples("coplctl data inspect data/sim-uf-p-4-avg",
                                        "coplctl data inspect data/sim-uf-p-4-avg --json | jq .splits",
                                        "coplctl data inspect data/uf-p-4-avg --backbone minilm"))
def inspect(path: DataDir, backbone: BackboneOpt = None, max_length: MaxLengthOpt = None, as_json: Json = False) -> None:
    """Summarise a dataset: users per group and role, annotations per user, pairs per split; with --backbone,
    the responses whose prompt (cut from its start) or response would be cut to the length limit."""
    from coplctl.data.dataset import load
    from coplctl.data.inspect import render, summarize

    ds = load(path)
    summary = summarize(ds)
    if backbone:
        from coplctl.models.backbone import truncation

        summary["truncation"] = truncation(backbone, ds.responses["prompt"], ds.responses["text"], max_length,
                                           ds.text_format)
    if as_json:
        print_json(summary)
    else:
        render(summary, out)


@app.command("embed", epilog=examples(
    "coplctl data embed data/sim-uf-p-2-all",
    "accelerate launch --num_processes 8 -m coplctl data embed data/uf-p-4-avg --backbone gemma-2b-it"))
def embed(path: DataDir, backbone: Annotated[str, typer.Option("--backbone", help="Backbone whose features to cache.")] = "minilm",
          max_length: MaxLengthOpt = None,
          precision: Annotated[str, typer.Option("--precision", help="auto, float32 or bfloat16 (see train's feature_precision).")] = "auto",
          batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Texts per forward pass.")] = 32,
          as_json: Json = False) -> None:
    """Cache the frozen features of a dataset's responses ($COPLCTL_CACHE/features), as frozen-mode training
    would. Under accelerate launch every process embeds its share into the shared cache directory."""
    from accelerate import PartialState

    from coplctl.core.progress import Counted
    from coplctl.data.dataset import load
    from coplctl.models.backbone import Backbone
    from coplctl.models.features import embed_all

    from coplctl.core.optim import resolve_device

    state = PartialState(cpu=resolve_device("auto").type == "cpu")  # under accelerate launch: joins the group
    ds = load(path)
    model = Backbone(backbone, max_length=max_length, precision=precision, device=str(state.device))
    bar = Counted("embedding texts (this process's share)") if state.is_main_process else None
    try:
        done = embed_all(model, ds.responses["prompt"], ds.responses["text"], batch_size=batch_size, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not state.is_main_process:
        return
    if as_json:
        print_json(done)
        return
    speed = f" in {done['seconds']:.1f} s ({done['texts_per_second']:,} texts/s)" if done["embedded"] else ""
    out.print(f"{done['texts']:,} distinct response texts, {done['embedded']:,} embedded{speed} on "
              f"{done['processes']} process(es); cut to the length limit: {done['truncated']['prompt']:,} prompts "
              f"(from their start), {done['truncated']['response']:,} responses. Cache: {done['cache']}",
              highlight=False, soft_wrap=True)
