"""CoPL adaptation from pairs on responses outside the GCF graph (nearest-neighbour placement, beyond the
paper) against adaptation from pairs on graph responses, for the same unseen users.

``holdout DATA OUT`` splits each unseen user's few-shot pairs (simulate them with ``--fewshot-pairs 16``)
into A (the first half) and B (the second half) and writes OUT/data: DATA without the training pairs on
any response of any B pair, so that B's responses are not graph nodes. It writes user files with the
unseen users' own ids and labels: ``A.jsonl`` (A pairs whose responses stay in the graph), ``B.jsonl``
(B pairs by id: responses the run knows but its graph lacks), ``B-text.jsonl`` (B pairs as rephrased
texts: each response's inner sentences shuffled, a text no run knows, with its prompt) and
``A-text.jsonl`` (A pairs rephrased likewise). Each user gets as many pairs in every file (the fewer
of A and B), so the comparisons are pair for pair.

``accuracy DATA RUN...`` prints, for runs written by ``coplctl adapt``, the adapted unseen users' test
accuracy (their ``test`` pairs of DATA, all on held-out test prompts) and the summary's pair counts.

``sweep DATA RUN USER_FILE --k ... [--embedding ridge|neighbours]`` adapts USER_FILE's users into RUN
in memory with each ``place_k`` and prints their test accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pandas as pd


def _rephrase(text: str, rng: random.Random) -> str:
    """The same sentences, the inner ones in another order (first and last kept)."""
    parts = [s.strip() for s in text.split(". ") if s.strip()]
    if len(parts) < 4:
        return text + " That is all."
    inner = parts[1:-1]
    order = list(range(len(inner)))
    while order == sorted(order):
        rng.shuffle(order)
    parts = [parts[0], *(inner[i] for i in order), parts[-1]]
    return ". ".join(p.rstrip(".") for p in parts[:-1]) + ". " + parts[-1]


def holdout(data: Path, out: Path) -> None:
    from coplctl.data import load

    ds = load(data)
    fs = ds.split("fewshot")
    halves = {"A": [], "B": []}
    for _, mine in fs.groupby("user_id", sort=False):
        half = len(mine) // 2
        halves["A"].append(mine.iloc[:half])
        halves["B"].append(mine.iloc[half:])
    A, B = pd.concat(halves["A"]), pd.concat(halves["B"])
    held = set(B["chosen_id"]) | set(B["rejected_id"])
    train = ds.pairs["split"] == "train"
    drop = train & (ds.pairs["chosen_id"].isin(held) | ds.pairs["rejected_id"].isin(held))
    pairs = ds.pairs[~drop]
    graph = set(pairs.loc[pairs["split"] == "train", "chosen_id"]) | set(pairs.loc[pairs["split"] == "train",
                                                                                   "rejected_id"])
    A = A[A["chosen_id"].isin(graph) & A["rejected_id"].isin(graph)]
    n = pd.concat([A.groupby("user_id").size(), B.groupby("user_id").size()], axis=1).fillna(0).min(axis=1)
    A = A[A.groupby("user_id").cumcount() < A["user_id"].map(n)]
    B = B[B.groupby("user_id").cumcount() < B["user_id"].map(n)]
    lost = set(ds.user_ids("seen")) - set(pairs.loc[pairs["split"] == "train", "user_id"])
    if lost:
        sys.exit(f"{len(lost)} seen users lose every training pair; use more survey pairs")
    new = type(ds)(ds.responses, ds.users, pairs.reset_index(drop=True), {**ds.meta, "holdout": len(held)})
    new.save(out / "data")
    r = ds.responses.set_index("response_id")
    rng = random.Random(0)

    def lines(p, text: bool):
        for u, c, rj in zip(p["user_id"], p["chosen_id"], p["rejected_id"]):
            if text:
                yield {"user": u, "prompt": r.prompt[c], "chosen": _rephrase(r.text[c], rng),
                       "rejected": _rephrase(r.text[rj], rng)}
            else:
                yield {"user": u, "chosen": c, "rejected": rj}

    for name, p, text in (("A", A, False), ("B", B, False), ("A-text", A, True), ("B-text", B, True)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines(p, text)))
    print(f"held out {len(held)} responses ({int(drop.sum())} of {int(train.sum())} training pairs dropped); "
          f"{B['user_id'].nunique()} users, {len(A)} pairs in A and in B (per user: {int(n.min())}-{int(n.max())})")


def _accuracy(method, ds, users) -> tuple[float, int]:
    from coplctl.models.reward import pair_scores

    test = ds.split("test")
    test = test[test["user_id"].isin(set(users))]
    s_c, s_r = pair_scores(method, test, ds.responses)
    return float((s_c > s_r).mean()), len(test)


def accuracy(data: Path, runs: list[Path]) -> None:
    from coplctl.data import load
    from coplctl.models.reward import load_method

    ds = load(data)
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        method = load_method(run)
        users = method.user_ids[method.seen_users:]
        acc, n = _accuracy(method, ds, users)
        counts = {k: summary.get(k) for k in ("pairs_in_graph", "pairs_placed", "pairs_outside_graph",
                                              "fallback_users")}
        print(f"{run}: unseen test accuracy {100 * acc:.2f} ({len(users)} users, {n} test pairs) {counts}")


def sweep(data: Path, run: Path, user_file: Path, ks: list[int], embedding: str) -> None:
    from coplctl.data import load
    from coplctl.models.reward import load_method
    from coplctl.serving.adapt_run import new_user_pairs

    ds = load(data)
    method = load_method(run)
    uf, _ = new_user_pairs(method.responses, user_file=user_file, new_responses=True)
    responses = pd.concat([method.responses, uf.new_responses], ignore_index=True)
    for k in ks:
        with method.variant(place_k=k, place_embedding=embedding):
            report = method.adapt(uf.pairs, responses)
            acc, n = _accuracy(method, ds, list(dict.fromkeys(uf.pairs["user_id"])))
        print(f"place_k={k} {embedding}: unseen test accuracy {100 * acc:.2f} ({n} test pairs; placed {report['pairs_placed']}, "
              f"left out {report['pairs_outside_graph']}, fallback users {report['fallback_users']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("holdout")
    h.add_argument("data", type=Path)
    h.add_argument("out", type=Path)
    a = sub.add_parser("accuracy")
    a.add_argument("data", type=Path)
    a.add_argument("runs", type=Path, nargs="+")
    s = sub.add_parser("sweep")
    s.add_argument("data", type=Path)
    s.add_argument("run", type=Path)
    s.add_argument("user_file", type=Path)
    s.add_argument("--k", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    s.add_argument("--embedding", choices=["ridge", "neighbours"], default="ridge")
    args = p.parse_args()
    if args.cmd == "holdout":
        holdout(args.data, args.out)
    elif args.cmd == "accuracy":
        accuracy(args.data, args.runs)
    else:
        sweep(args.data, args.run, args.user_file, args.k, args.embedding)


if __name__ == "__main__":
    main()
