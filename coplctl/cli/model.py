"""`coplctl train / evaluate / score`: reward methods end to end."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer

from coplctl.cli.common import (Backbone, Data, Epochs, Force, Json, Lr, Mode, Out, ReportTo, RewardRun, Seed, Sets,
                                err, examples, out, parse_sets, print_json)

app = typer.Typer()  # top-level commands: coplctl train, evaluate, score


@app.command("train", epilog=examples(
    "coplctl train copl --data data/sim-uf-p-2-all --backbone minilm --mode frozen --out runs/copl",
    "coplctl train copl --data data/uf-p-4-avg --backbone gemma-2b-it --mode lora --out runs/copl-2b",
    "coplctl train copl --data data/sim --out runs/no-mole --set mole=false",
    "coplctl train uniform --data data/sim-uf-p-2-all --out runs/uniform --json | jq .metrics.valid_accuracy",
    "coplctl train copl --data data/sim --out runs/copl --report-to tensorboard && tensorboard --logdir runs/copl/logs",
    "coplctl train copl --data data/uf-p-2-all --backbone gemma-2b-it --mode lora --out runs/copl-2b "
    "--set gradient_checkpointing=true --set checkpoint_every=200",
    "accelerate launch --multi_gpu --num_processes 4 -m coplctl train copl --data data/uf-p-4-avg "
    "--backbone gemma-7b-it --mode lora --out runs/copl-7b"))
def train(
    method: Annotated[str, typer.Argument(help="A registered method (see coplctl methods).", show_default=False)],
    data: Data,
    out_dir: Out,
    backbone: Backbone = None,
    mode: Mode = None,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Pairs per step.")] = None,
    sets: Sets = None,
    seed: Seed = 0,
    report_to: ReportTo = "none",
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Train a reward method on a dataset's seen users and save the run.

    The run directory is --out; --json prints it with what training.json records (method, data, seed, metrics).
    Work in progress (CoPL's GCF, the training state at each epoch's end and every checkpoint_every steps)
    is kept beside it in .OUT.work: the same command, run again after a crash or kill, resumes from there
    (--force starts over); it is deleted once the run is saved.
    """
    from coplctl.core.atomic import check_output, locked, refuse_overlap
    from coplctl.core.errors import CoplError
    from coplctl.core.registry import METHODS
    from coplctl.data import load
    from coplctl.models.reward import make_config
    from coplctl.models.tracking import check_tracker
    from coplctl.models.train_config import distributed_state

    check_tracker(report_to)
    cls = METHODS.get(method)
    overrides = {k: v for k, v in {"backbone": backbone, "mode": mode, "epochs": epochs, "lr": lr,
                                   "batch_size": batch_size}.items() if v is not None}
    overrides.update(parse_sets(sets or []))
    cfg = make_config(cls.Config, overrides, owner=f"method {method}")
    refuse_overlap(out_dir, {"the dataset": data})
    check_output(out_dir, force=force, marker="method.json", kind="reward-model run")
    ds = load(data)
    work = out_dir.parent / f".{out_dir.name}.work"  # resumable intermediate work (e.g. CoPL's GCF)
    state = distributed_state(cfg)
    lock_file = out_dir.parent / f".{out_dir.name}.lock"
    with contextlib.ExitStack() as stack:
        problem = None
        if state.is_main_process:  # one `train` per --out at a time
            try:
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                stack.enter_context(locked(lock_file, str(out_dir), by="coplctl train",
                                           advice="wait for it or use another --out"))
                stack.callback(lock_file.unlink, missing_ok=True)  # by its holder, before the lock is released
            except (CoplError, OSError) as e:
                problem = str(e)
        if state.num_processes > 1:  # the other processes must not train without the main one
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise CoplError(problem)
        if force and state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        state.wait_for_everyone()
        _train(method, cls, cfg, ds, data, out_dir, work, seed, report_to, as_json, state)


def _train(method, cls, cfg, ds, data, out_dir, work, seed, report_to, as_json, state) -> None:
    """Fit and save (the body of ``train``, under its lock)."""
    from coplctl.bench.results import data_hash
    from coplctl.core.atomic import atomic_write_text
    from coplctl.core.errors import CoplError

    model = cls(cfg)
    tracked = {"report_to": report_to} if report_to != "none" else {}
    if tracked and not _accepts(model.fit, "report_to"):
        raise CoplError(f"method {method} does not support --report-to (its fit takes no report_to)")
    metrics = model.fit(ds, seed=seed, work_dir=work, **tracked)
    if state.is_main_process:
        model.save(out_dir, overwrite=True)
        if (work / "logs").is_dir():  # the tracker's files, kept in the work dir while training (resumable)
            shutil.move(str(work / "logs"), str(out_dir / "logs"))
        info = {"method": method, "data": str(data), "data_hash": data_hash(data), "seed": seed, "metrics": metrics,
                "data_meta": {k: ds.meta.get(k) for k in ("source", "variant", "annotations", "seed", "counts")}}
        atomic_write_text(out_dir / "training.json", json.dumps(info, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)
        if as_json:
            print_json({"run": str(out_dir), **info})
        else:
            out.print(f"{method}: best validation accuracy {100 * metrics['valid_accuracy']:.2f} "
                      f"(epoch {metrics['best_epoch']} of {len(metrics['history'])})")
        err.print(f"wrote {out_dir}. Next: coplctl evaluate {out_dir} --data {data}", highlight=False,
                  soft_wrap=True)
    state.wait_for_everyone()


def _accepts(fn, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


@app.command("evaluate", epilog=examples("coplctl evaluate runs/copl --data data/sim-uf-p-2-all",
                                         "coplctl evaluate runs/copl --data data/sim-uf-p-2-all --json"))
def evaluate(
    run: RewardRun,
    data: Data,
    fewshot: Annotated[Optional[int], typer.Option(
        "--fewshot", min=1, help="Adapt unseen users from only their first N few-shot pairs.")] = None,
    other_data: Annotated[bool, typer.Option(
        "--other-data", help="Evaluate on a dataset other than the one the run was trained on (its evaluation "
                             "goes to --out, never to RUN/evaluation.json).")] = False,
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="Also write the evaluation JSON here (with --other-data: the only place it is written).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
    as_json: Json = False,
) -> None:
    """Seen and unseen users' test accuracy, common vs controversial pairs (writes RUN/evaluation.json when DATA
    is the dataset the run was trained on, as training.json records it)."""
    from coplctl.bench.results import data_hash
    from coplctl.core.atomic import atomic_write_text, check_file_output
    from coplctl.core.errors import CoplError
    from coplctl.core.files import read_json
    from coplctl.data import load
    from coplctl.models.evaluate import evaluate as run_eval
    from coplctl.models.evaluate import render
    from coplctl.models.reward import load_method

    trained = read_json(run / "training.json", what="training record") if (run / "training.json").is_file() else {}
    same = trained.get("data_hash") is None or trained["data_hash"] == data_hash(data)
    if not same and not other_data:
        raise CoplError(f"{data} is not the dataset {run} was trained on ({trained.get('data')}, by content hash in "
                        f"training.json): its user ids may collide with the run's. Pass --other-data to evaluate "
                        f"on it anyway (with --out FILE to keep the result)")
    if out_file is not None:
        out_file = check_file_output(out_file, force=force, inputs={"the run": run, "the dataset": data},
                                     option="--out")
    method = load_method(run)
    result = run_eval(method, load(data), fewshot=fewshot, progress=True)
    result.update(data=str(data), fewshot=fewshot)
    text = json.dumps(result, indent=2) + "\n"
    if same:
        atomic_write_text(run / "evaluation.json", text)
    if out_file is not None:
        atomic_write_text(out_file, text)
    if as_json:
        print_json(result)
    else:
        render(result, out, f"{method.registry_name} on {data}")


@app.command("score", epilog=examples(
    "coplctl score runs/copl --user u00042 --prompt 'How do I fix a leaking faucet?' --response 'Turn off ...'",
    "coplctl score runs/copl --input requests.jsonl --output rewards.jsonl",
    "coplctl score runs/copl --input requests.jsonl --json | jq '.[].reward'"))
def score(
    run: RewardRun,
    user: Annotated[Optional[str], typer.Option("--user", help="User id (seen, or adapted into RUN).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="The prompt.")] = None,
    response: Annotated[Optional[str], typer.Option("--response", help="The response to score.")] = None,
    input_file: Annotated[Optional[Path], typer.Option(
        "--input", help='JSONL of {"user", "prompt", "response"} to score in one go.')] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help=(
        "Write JSONL here instead of stdout (a new file, or an existing one with --force; never inside a run or "
        "dataset, never over a symlink, pipe or device; - is stdout)."))] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON array of {user, prompt, response, reward} objects instead of a number or "
                       "JSONL lines (with --output too, which still gets JSONL).")] = False,
) -> None:
    """Reward of a response for a user, or of every line of a JSONL file."""
    from coplctl.core.atomic import atomic_write_text, check_file_output
    from coplctl.core.errors import CoplError, DataError
    from coplctl.models.evaluate import read_score_requests, score_frame
    from coplctl.models.reward import load_method

    if input_file is not None and (user, prompt, response) != (None, None, None):
        raise typer.BadParameter("give --input FILE, or --user, --prompt and --response; not both",
                                 param_hint="--input")
    if input_file is None:
        if None in (user, prompt, response):
            raise CoplError("give --user, --prompt and --response, or --input FILE")
        rows, line_of = [{"user": user, "prompt": prompt, "response": response}], None
    else:
        rows, line_of = read_score_requests(input_file)
    jsonl_stdout = output is not None and str(output) in ("-", "/dev/stdout")
    if output is not None:  # one rule for outputs: never over an input, a run's files, a special file
        output = check_file_output(output, force=force, inputs={"the --input file": input_file, "the run": run})
    method = load_method(run)
    index = getattr(method, "user_index", None) if getattr(method, "personalized", False) else None
    if index is not None:
        for i, r in enumerate(rows):
            if r["user"] not in index:
                why = (f"unknown user {r['user']!r}: neither seen in training nor adapted into {run} "
                       f"(coplctl adapt --model {run} --user-file FILE --out NEW_RUN adds new users)")
                if line_of is None:
                    raise CoplError(why)
                raise DataError(input_file, why, line=line_of[i])
    rewards = method.score([r["user"] for r in rows], score_frame(rows)).tolist()
    scored = [{**r, "reward": v} for r, v in zip(rows, rewards)]
    lines = [json.dumps(r) for r in scored]
    if output is not None:
        atomic_write_text(output, "\n".join(lines) + "\n")
    if as_json:
        print_json(scored)
    elif output is None and input_file is None and not jsonl_stdout:
        out.print(f"{rewards[0]:.6f}")
    elif output is None:
        typer.echo("\n".join(lines))


@app.command("serve", epilog=examples(
    "coplctl serve runs/copl --port 8000",
    "curl -s localhost:8000/reward -d '{\"items\": [{\"user\": \"u0001\", \"prompt\": \"Hi?\", \"response\": \"Hello!\"}]}'",
    "curl -s localhost:8000/users -d '{\"pairs\": [{\"user\": \"alice\", \"chosen\": \"r12\", \"rejected\": \"r13\"}]}'"))
def serve(
    run: RewardRun,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most items one request may score.")] = 1024,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.001, help="Largest request body, in MB.")] = 8.0,
    users_dir: Annotated[Optional[Path], typer.Option(
        "--users-dir", help="Where POST /users stores new users (replayed at start) [default: RUN/served-users].",
        show_default=False)] = None,
    max_user_pairs: Annotated[int, typer.Option("--max-user-pairs", min=1,
                                                help="Most annotation pairs one POST /users may carry.")] = 1000,
    read_only: Annotated[bool, typer.Option("--read-only", help="Take no new users (POST /users answers 403); "
                                            "stored ones are still served.")] = False,
) -> None:
    """Serve RUN's rewards over HTTP: POST /reward with {"items": [{"user", "prompt", "response"}, ...]} (or
    OpenRLHF's request); POST /users with {"pairs": [...]} learns new users and keeps them beside the run;
    GET /health and /info. Needs the serve extra (pip install 'coplctl\\[serve]')."""
    from importlib.util import find_spec

    from coplctl.core.errors import CoplError
    from coplctl.serving.api import load

    if find_spec("starlette") is None or find_spec("uvicorn") is None:
        raise CoplError("coplctl serve needs starlette and uvicorn: pip install 'coplctl[serve]'")
    from coplctl.serving.overlay import Overlay, overlay_dir, replay
    from coplctl.serving.server import check_port
    from coplctl.serving.server import serve as run_server

    check_port(host, port)  # before loading the run and announcing anything
    rm = load(run)
    where = overlay_dir(run, users_dir)
    options = dict(host=host, port=port, max_batch=max_batch, max_body_bytes=int(max_body_mb * 1e6),
                   max_user_pairs=max_user_pairs)
    if read_only:
        added = replay(rm, where)
        err.print(f"serving {rm.name} from {run} on http://{host}:{port} ({added} stored users; read-only)")
        run_server(rm, **options)
        return
    overlay = Overlay(where)
    with overlay.open(rm) as added:
        err.print(f"serving {rm.name} from {run} on http://{host}:{port} (POST /reward, POST /users, GET /health, "
                  f"GET /info); {added} stored users from {where}")
        run_server(rm, overlay=overlay, **options)
