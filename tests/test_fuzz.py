"""Property-based fuzzing of everything coplctl reads from a user: user files, `score --input` request
files, benchmark specs, results files and run directories. Whatever the bytes, a reader either returns
a correct value or raises the project's own error (CoplError, one line for the CLI); any other
exception is a bug. Examples are bounded and derandomized, so CI runs the same cases every time."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coplctl.core.errors import CoplError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

RESPONSES = pd.DataFrame({"response_id": ["r1", "r2", "r3", "r4", "r5"],
                          "prompt": ["p1", "p1", "p1", "p2", "p2"],
                          "text": ["same", "same", "B", "C", "D\u2028E"]})
SEEN = {"alice"}

# JSON values, shallow and deep; text biased towards known ids, texts and tricky characters
TEXT = st.one_of(st.sampled_from(["r1", "r2", "r3", "r4", "r5", "same", "B", "C", "D\u2028E", "", "alice", "p1",
                                  "\ud800", "Hi \udfff", "\ud83d\ude00"]),  # lone surrogates and a valid pair
                 st.text(max_size=8))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
RECORD = st.fixed_dictionaries({}, optional={"user": VALUE | TEXT, "chosen": TEXT | VALUE, "rejected": TEXT | VALUE,
                                             "prompt": TEXT | VALUE, "response": TEXT})
LINE = st.one_of(RECORD.map(json.dumps), VALUE.map(json.dumps), st.text(max_size=20),
                 st.just("[" * 5000 + "]" * 5000), st.just(""))


def _file_bytes(lines: list[str], encoding: str, garbage: bytes) -> bytes:
    text = "\n".join(lines)
    data = text.encode(encoding, errors="surrogatepass") if encoding != "utf-8" else text.encode("utf-8", "surrogatepass")
    return data + garbage


CONTENT = st.builds(_file_bytes, st.lists(LINE, max_size=6), st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16"]),
                    st.one_of(st.just(b""), st.just(b""), st.binary(max_size=4)))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(content=CONTENT, skip=st.booleans())
def test_user_file_reader(scratch, content, skip):
    from coplctl.data.userfile import read_user_file

    f = scratch / "users.jsonl"
    f.write_bytes(content)
    try:
        uf = read_user_file(f, RESPONSES, skip_invalid=skip, seen_users=SEEN)
    except CoplError:
        return
    pairs = uf.pairs
    assert len(pairs) > 0
    for col in ("user_id", "chosen_id", "rejected_id"):
        assert all(isinstance(v, str) and v.encode("utf-8") for v in pairs[col])  # no lone surrogate gets through
    prompt = RESPONSES.set_index("response_id")["prompt"]
    assert pairs["chosen_id"].isin(prompt.index).all() and pairs["rejected_id"].isin(prompt.index).all()
    assert (pairs["chosen_id"] != pairs["rejected_id"]).all()
    assert (pairs["chosen_id"].map(prompt) == pairs["rejected_id"].map(prompt)).all()
    assert not pairs["user_id"].isin(SEEN).any()
    assert not pairs.duplicated(["user_id", "chosen_id", "rejected_id"]).any()


@FUZZ
@given(content=CONTENT)
def test_score_request_reader(scratch, content):
    from coplctl.models.evaluate import read_score_requests

    f = scratch / "requests.jsonl"
    f.write_bytes(content)
    try:
        rows, lines = read_score_requests(f)
    except CoplError:
        return
    assert rows and len(rows) == len(lines) and lines == sorted(set(lines))
    assert all(isinstance(r[k], str) and r[k].encode("utf-8") for r in rows for k in ("user", "prompt", "response"))


SPEC_KEYS = st.sampled_from(["name", "description", "include", "data", "methods", "seeds", "common", "overrides",
                             "ablations", "tables", "figures", "fewshot", "pseudo_labels", "source", "variant",
                             "experiments", "adaptation_variants", "fewshot_curve", "run_figures", "adaptation",
                             "users", "epochs", "lr", "mode", "backbone", "copl", "uniform", "x"])
SPEC_VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(SPEC_KEYS, inner, max_size=4)), max_leaves=10)
YAML_TEXT = st.one_of(
    st.dictionaries(SPEC_KEYS, SPEC_VALUE, max_size=6).map(lambda d: __import__("yaml").safe_dump(d)),
    st.text(max_size=40), st.just("!!python/object/apply:os.system ['true']"), st.just("[" * 5000 + "]" * 5000),
    st.just("name: ../escape\nmethods: [uniform]\n"), st.just("include: self.yaml\n"),
    # aliases: a shared value (PyYAML writes &id001 / *id001) and a nested alias bomb, at the top and under common
    st.dictionaries(SPEC_KEYS, SPEC_VALUE, min_size=1, max_size=3).map(
        lambda d: __import__("yaml").safe_dump({"shared": d, "common": d, "x": [d, d]})),
    st.sampled_from(["", "common:\n  "]).map(lambda indent: indent + ("\n" + indent).join(
        ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
        [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")])))


@FUZZ
@given(text=YAML_TEXT, utf16=st.booleans())
def test_spec_loader(scratch, text, utf16):
    from coplctl.bench.spec import load_spec

    f = scratch / "self.yaml"
    f.write_bytes(text.encode("utf-16" if utf16 else "utf-8", errors="surrogatepass"))
    t0 = time.perf_counter()
    try:
        spec = load_spec(str(f))
    except CoplError:
        assert time.perf_counter() - t0 < 5  # refused before anything expands (an alias bomb takes minutes)
        return
    assert "/" not in spec.name and not spec.name.startswith(".")
    spec.jobs()


RESULT = st.fixed_dictionaries({"spec": TEXT, "name": st.one_of(TEXT, st.sampled_from(["copl", "oracle"])), "seed": SCALAR},
                               optional={"metrics": VALUE, "extra": VALUE, "config": VALUE, "method": TEXT})


@FUZZ
@given(result=st.one_of(RESULT.map(json.dumps), LINE, VALUE.map(json.dumps)))
def test_results_loader_and_tables(scratch, result):
    from coplctl.bench.results import load_results
    from coplctl.bench.tables import build_report

    d = scratch / "results" / "spec" / "m"
    shutil.rmtree(scratch / "results", ignore_errors=True)
    d.mkdir(parents=True)
    (d / "seed0.json").write_text(result, encoding="utf-8", errors="surrogatepass")
    try:
        results = load_results(scratch / "results")
        build_report(results)[0]
    except CoplError:
        return
    for r in results:  # what loads is true: finite shares in [0, 1], finite non-negative counts
        for block in r["metrics"].values():
            for k, v in (block or {}).items():
                if isinstance(v, (int, float)) and k in ("accuracy", "common", "controversial", "ties",
                                                         "controversial_pairs"):
                    assert math.isfinite(v) and v >= 0 and (v <= 1 or k in ("ties", "controversial_pairs"))


# -- run directories ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def graph_run(tiny_dir, tmp_path_factory) -> Path:
    from coplctl.data import load
    from coplctl.graph.config import preset_config
    from coplctl.graph.train import train_gcf

    out = tmp_path_factory.mktemp("fuzz-gcf") / "gcf"
    train_gcf(load(tiny_dir), out, preset_config("cpu", dim=4, layers=2, epochs=2, patience=0, min_epochs=0),
              progress=False)
    return out


def _mutate(data: bytes, how: str, at: float, payload: bytes) -> bytes:
    i = int(at * len(data))
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] if i < len(data) else data + payload
    if how == "insert":
        return data[:i] + payload + data[i:]
    return payload  # replace


def _damaged_copy(src: Path, dest: Path, name: str, mutation) -> Path:
    """A fresh copy of run ``src`` at ``dest`` with file ``name`` mutated."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    (dest / name).write_bytes(_mutate((dest / name).read_bytes(), *mutation))
    return dest


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "insert", "replace"]), st.floats(0, 1),
                     st.one_of(st.binary(max_size=16), VALUE.map(lambda v: json.dumps(v).encode())))


@FUZZ
@given(name=st.sampled_from(["config.json", "metrics.json", "graph.json", "graph.safetensors",
                             "embeddings.safetensors", "responses.parquet"]), mutation=MUTATION)
def test_graph_run_loader(graph_run, scratch, name, mutation):
    from coplctl.graph.run import GCFRun

    run = _damaged_copy(graph_run, scratch / "gcf", name, mutation)
    try:
        loaded = GCFRun(run)
        loaded.responses, loaded.exported_user_emb  # noqa: B018 (read lazily: must not crash either)
    except CoplError:
        return
    assert loaded.user_emb.shape[0] == loaded.graph.num_users


@pytest.fixture(scope="module")
def model_run(micro_dir, tmp_path_factory) -> Path:
    from coplctl.baselines.oracle import Oracle
    from coplctl.data import load

    out = tmp_path_factory.mktemp("fuzz-model") / "oracle"
    method = Oracle(epochs=1, trunk_width=16)
    method.fit(load(micro_dir), progress=False)
    method.save(out)
    return out


@settings(FUZZ, max_examples=30)
@given(name=st.sampled_from(["method.json", "users.json", "groups.json", "model.safetensors", "responses.parquet"]),
       mutation=MUTATION)
def test_model_run_loader(model_run, scratch, name, mutation):
    from coplctl.models.reward import load_method

    run = _damaged_copy(model_run, scratch / "model", name, mutation)
    try:
        load_method(run)
    except CoplError:
        return


# -- outputs ------------------------------------------------------------------------------------------------

OUTPUT = st.sampled_from(["new.jsonl", "sub/new.jsonl", "existing.txt", "link", "pipe", "dir", "-", "/dev/stdout",
                          "run/model.safetensors", "run/method.json", "run/new.png", "run/sub/x", "data/pairs.parquet",
                          "data/x.jsonl", "input.jsonl", "run", "data"])


@FUZZ
@given(name=OUTPUT, force=st.booleans())
def test_outputs_never_land_on_inputs_or_special_files(scratch, name, force):
    """The one output rule: whatever the path, a command either gets a new (or, with --force, an existing
    regular) file outside every run and dataset, or standard output, or one CoplError; nothing is touched."""
    from coplctl.core.atomic import check_file_output

    root = scratch / "outputs"
    if not root.exists():
        root.mkdir()
        (root / "run").mkdir()
        (root / "run" / "method.json").write_text("{}")
        (root / "data").mkdir()
        (root / "data" / "meta.json").write_text("{}")
        (root / "existing.txt").write_text("keep")
        (root / "input.jsonl").write_text("{}")
        (root / "link").symlink_to(root / "existing.txt")
        os.mkfifo(root / "pipe")
        (root / "dir").mkdir()
    before = sorted(p.name for p in root.rglob("*"))
    dest = name if name in ("-", "/dev/stdout") else root / name
    try:
        got = check_file_output(dest, force=force, inputs={"the input file": root / "input.jsonl", "the run": root / "run"})
    except CoplError:
        got = "refused"
    assert sorted(p.name for p in root.rglob("*")) == before and (root / "existing.txt").read_text() == "keep"
    if name in ("-", "/dev/stdout"):
        assert got is None
    elif name in ("new.jsonl", "sub/new.jsonl") or (name == "existing.txt" and force):
        assert got == root / name
    else:
        assert got == "refused"
