"""`coplctl export`: a run as a standard adapter folder others can load (and push to the hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Force, Json, RewardRun, err, examples, out, print_json

app = typer.Typer()


@app.command("export", epilog=examples(
    "coplctl export runs/copl-2b --format peft --out exports/copl-2b",
    "coplctl export runs/uniform-2b --format peft --out exports/uniform-2b --push-to-hub me/uniform-2b-reward",
    "coplctl export runs/copl-2b --format hf --user u17 --out exports/copl-2b-u17"))
def export(
    run: RewardRun,
    out_dir: Annotated[Path, typer.Option("--out", help="The export folder to write.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="Export format: peft (adapter_config.json, "
                                     "adapter_model.safetensors, a sidecar and a model card) or hf (one user's "
                                     "reward as a standard AutoModelForSequenceClassification).")] = "peft",
    user: Annotated[Optional[str], typer.Option("--user", help="With --format hf: the user whose reward to export.",
                                                show_default=False)] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="With --format hf: the group whose reward to export "
                                                 "(Oracle's group models).", show_default=False)] = None,
    push: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="REPO_ID", help="Also upload the folder to this Hugging Face repo "
                                                "(needs a token: hf auth login, or HF_TOKEN).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Export a lora-mode run as a peft adapter (baselines load with PeftModel.from_pretrained, CoPL's
    experts with coplctl.serving.export.load_peft), or one user's reward as a standard transformers
    sequence-classification model (--format hf: adapters and the user's experts merged; TRL, OpenRLHF's
    --reward_pretrain and plain transformers load it)."""
    from coplctl.core.errors import CoplError
    from coplctl.serving.export import FORMATS, export_peft, push_to_hub

    from coplctl.core.atomic import refuse_inside_known

    if fmt not in FORMATS:
        raise CoplError(f"--format {fmt!r}: the formats are {', '.join(FORMATS)}")
    refuse_inside_known(out_dir)
    if fmt == "hf":
        from coplctl.serving.hf_export import export_hf

        summary = export_hf(run, out_dir, user=user, group=group, force=force)
    elif user is not None or group is not None:
        raise CoplError("--user and --group choose whose reward an hf export holds; a peft export holds every user's "
                        "(use --format hf)")
    else:
        summary = export_peft(run, out_dir, force=force)
    if push is not None:
        summary["hub_url"] = push_to_hub(out_dir, push, private=private)
    if as_json:
        print_json(summary)
    elif fmt == "hf":
        out.print(f"exported the {summary['method']} reward of {summary['reward_of']} as {summary['architecture']} "
                  f"({summary['merged_layers']} merged layers; reward = logit + {summary['reward_offset']:.6g}) to "
                  f"{out_dir}" + (f"; pushed to {summary['hub_url']}" if push else ""), highlight=False, soft_wrap=True)
    else:
        out.print(f"exported {summary['method']} ({summary['peft_type']}, {summary['adapter_tensors']} adapter "
                  f"tensors, {summary['users']} users) to {out_dir}" +
                  (f"; pushed to {summary['hub_url']}" if push else ""), highlight=False, soft_wrap=True)
        err.print(f"model card: {out_dir / 'README.md'}", highlight=False, soft_wrap=True)
