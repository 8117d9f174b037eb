"""The plan of `coplctl benchmark SPEC --dry-run`, as a person reads it."""

from __future__ import annotations

from coplctl.cli.common import out

GIB = 2 ** 30


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f}G" if n >= GIB else f"{n / GIB:.2f}G"


def _lrs(rows: list[dict]) -> str:
    lrs = list(dict.fromkeys(r["lr"] for r in rows))
    if rows[0]["searched"]:
        return f"{len(lrs)}: {lrs[0]:.0e}..{lrs[-1]:.0e}"
    return "-" if lrs[0] is None else f"{lrs[0]:g}"


def print_plan(p: dict) -> None:
    """Data, setup, one row per job (method or ablation) with its trainings' status and memory, the formula's
    inputs."""
    from rich.table import Table

    d = p["data"]
    say = lambda text: out.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"plan of {p['spec']} ({p['spec_file']}), results in {p['out']}")
    say(f"data: {d['source']} {d['path']}: {d['status']}")
    for b in p["backbones"]:
        setting = "" if b["precision_setting"] != "auto" else " (auto: bfloat16 on a GPU, float32 on a CPU)"
        say(f"backbone {b['backbone']}, {b['mode']} mode, weights {b['precision']} here{setting}")
    say(f"{p['processes']} process(es) on {p['device']} (accelerate launch --num_processes N for more); "
        f"seeds {', '.join(map(str, p['seeds']))}")
    say(f"{len(p['jobs'])} trainings: {p['to_run']} to run, {p['finished']} finished in {p['out']} (skipped)")
    mem = p["memory"]
    t = Table(title=None)
    for col in ("job", "lr", "run", "done", *(("GPU", "ckpt", "CPU fp32") if mem else ())):
        t.add_column(col, justify="left" if col in ("job", "lr") else "right")
    for name in dict.fromkeys(r["name"] for r in p["jobs"]):
        rows = [r for r in p["jobs"] if r["name"] == name]
        other = sorted({r["status"] for r in rows if not r["status"].startswith(("to run", "finished"))})
        method = rows[0]["method"]
        cells = [name + ("" if method == name else f" ({method})") + "".join(f"; {o}" for o in other), _lrs(rows),
                 str(sum(r["status"].startswith("to run") for r in rows)),
                 str(sum(r["status"].startswith("finished") for r in rows))]
        if mem:
            m = mem.get(name)
            if m and m["gpu"].get("available"):
                cells += [_gib(m["gpu"]["total"]), _gib(m["gpu"]["total_other_checkpointing"]), _gib(m["cpu"]["total"])]
            else:
                cells += ["-", "-", "-"]
        t.add_row(*cells)
    out.print(t)
    say("lr: the rate, or how many rates a search tries (first..last)" + (
        "; GPU: estimated peak memory per process in the job's dtype, ckpt: the same with gradient checkpointing "
        "switched the other way, CPU fp32: on a CPU" if mem else ""))
    missing = {m["gpu"]["why"] for m in mem.values() if not m["gpu"].get("available")}
    for why in missing:
        say(f"memory not estimated: {why}")
    g = next((m["gpu"] for m in mem.values() if m["gpu"].get("available")), None)
    if g:
        say(f"memory = weights {_gib(g['weights'])} ({g['parameters'] / 1e9:.2f}B parameters in {g['dtype_bytes']}-byte "
            f"{g['dtype']}; config: {g['config']}) + trained parameters with AdamW state "
            f"({g['trainable_parameters'] / 1e6:.1f}M for the first job) + activations of {g['tokens']:,} tokens (batch "
            f"{g['batch_size']} pairs x 2 texts x {g['max_length']} tokens, every text counted at the length limit: an "
            f"upper bound); gradient checkpointing {'on' if g['gradient_checkpointing'] else 'off'}. The formula: "
            f"coplctl/models/memory.py. Less: " + ("" if g["gradient_checkpointing"] else
                                                   "--set gradient_checkpointing=true, ")
            + "--set batch_size=N, --set max_length=N.")
