"""`coplctl export`: a run as a standard adapter folder others can load (and push to the hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import Force, Json, RewardRun, err, examples, out, print_json

app = typer.Typer()


@app.command("export", epilog=examples(
    "coplctl export runs/copl-2b --format peft --out exports/copl-2b",
    "coplctl export runs/uniform-2b --format peft --out exports/uniform-2b --push-to-hub me/uniform-2b-reward"))
def export(
    run: RewardRun,
    out_dir: Annotated[Path, typer.Option("--out", help="The export folder to write.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="Export format: peft (adapter_config.json, "
                                     "adapter_model.safetensors, a sidecar and a model card).")] = "peft",
    push: Annotated[Optional[str], typer.Option(
        "--push-to-hub", metavar="REPO_ID", help="Also upload the folder to this Hugging Face repo "
                                                "(needs a token: hf auth login, or HF_TOKEN).")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --push-to-hub: create the repo private.")] = False,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Export a lora-mode run as a peft adapter: baselines load with PeftModel.from_pretrained, CoPL's
    experts with coplctl.serving.export.load_peft (a plain peft load refuses them rather than dropping them)."""
    from coplctl.core.errors import CoplError
    from coplctl.serving.export import FORMATS, export_peft, push_to_hub

    from coplctl.core.atomic import refuse_inside_known

    if fmt not in FORMATS:
        raise CoplError(f"--format {fmt!r}: the formats are {', '.join(FORMATS)}")
    refuse_inside_known(out_dir)
    summary = export_peft(run, out_dir, force=force)
    if push is not None:
        summary["hub_url"] = push_to_hub(out_dir, push, private=private)
    if as_json:
        print_json(summary)
    else:
        out.print(f"exported {summary['method']} ({summary['peft_type']}, {summary['adapter_tensors']} adapter "
                  f"tensors, {summary['users']} users) to {out_dir}" +
                  (f"; pushed to {summary['hub_url']}" if push else ""), highlight=False, soft_wrap=True)
        err.print(f"model card: {out_dir / 'README.md'}", highlight=False, soft_wrap=True)
