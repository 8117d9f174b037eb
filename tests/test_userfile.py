"""User files: encodings, hostile lines, pairs across prompts, seen users; every problem names file and line."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from coplctl.core.errors import DataError
from coplctl.data.userfile import read_user_file

RESPONSES = pd.DataFrame({
    "response_id": ["a1", "a2", "b1", "b2", "c1"],
    "prompt": ["A?", "A?", "B?", "B?", "C?"],
    "text": ["yes", "no", "yes", "maybe", "sure"],
})
GOOD = {"user": "ann", "chosen": "a1", "rejected": "a2"}


def _write(tmp_path, lines, name="users.jsonl", **kw):
    f = tmp_path / name
    f.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                 **kw)
    return f


def _both_ways(f, message, line, **kw):
    """An error naming the line, or with skip_invalid the line skipped with that reason and GOOD kept."""
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read_user_file(f, RESPONSES, **kw)
    assert e.value.line == line and e.value.file == str(f)
    uf = read_user_file(f, RESPONSES, skip_invalid=True, **kw)
    assert [s["line"] for s in uf.skipped_lines] == [line]
    assert message in uf.skipped_lines[0]["reason"]
    assert uf.pairs[["user_id", "chosen_id", "rejected_id"]].values.tolist() == [["ann", "a1", "a2"]]
    return uf


def test_pair_across_prompts_is_refused(tmp_path):
    f = _write(tmp_path, [GOOD, {"user": "bob", "chosen": "a1", "rejected": "b2"}])
    uf = _both_ways(f, "chosen and rejected answer different prompts", 2)
    assert uf.skipped_users == [{"user": "bob", "lines": [2], "reason": "no usable pair"}]
    # by text, the prompt field picks the responses of that prompt: the pair is then consistent
    f = _write(tmp_path, [{"user": "bob", "chosen": "yes", "rejected": "maybe", "prompt": "B?"}])
    assert read_user_file(f, RESPONSES).pairs[["chosen_id", "rejected_id"]].values.tolist() == [["b1", "b2"]]


def test_seen_users_are_refused_by_line(tmp_path):
    f = _write(tmp_path, [GOOD, {"user": "u7", "chosen": "b1", "rejected": "b2"}])
    uf = _both_ways(f, "user 'u7' is a seen user of the run; adapt gives new users only, pick another id", 2,
                    seen_users=["u7", "u8"])
    assert uf.skipped_users == []  # reported once, as its line
    assert len(read_user_file(f, RESPONSES).pairs) == 2  # without seen users given, u7 is just a new user


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_non_utf8_file_is_one_error_even_when_skipping(tmp_path, encoding):
    f = _write(tmp_path, [GOOD, {"user": "zoë", "chosen": "b1", "rejected": "b2"}], encoding=encoding)
    for skip in (False, True):
        with pytest.raises(DataError, match="is not UTF-8 text") as e:
            read_user_file(f, RESPONSES, skip_invalid=skip)
        assert e.value.file == str(f)


def test_bom_and_crlf_are_read(tmp_path):
    f = tmp_path / "users.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n" + json.dumps({**GOOD, "user": "bo"}) + "\r\n").encode())
    assert read_user_file(f, RESPONSES).pairs["user_id"].tolist() == ["ann", "bo"]


@pytest.mark.parametrize("bad, message", [
    ("[" * 100_000, "JSON nested too deeply to read"),
    ('{"user": {"a": ' * 50_000 + "1" + "}" * 50_001, "JSON nested too deeply to read"),
    ('{"user": 1' + "0" * 5000 + ', "chosen": "b1", "rejected": "b2"}', "invalid JSON (Exceeds the limit"),
    ("{oops", "invalid JSON"),
    ("[1, 2]", "each line must be a JSON object"),
    ({"user": True, "chosen": "b1", "rejected": "b2"}, "user must be a non-empty string"),
    ({"user": 1.5, "chosen": "b1", "rejected": "b2"}, "user must be a non-empty string"),
    ({"user": ["x"], "chosen": "b1", "rejected": "b2"}, "user must be a non-empty string"),
    ({"user": "", "chosen": "b1", "rejected": "b2"}, "user must be a non-empty string"),
    ({"user": "bob", "chosen": 5, "rejected": "b2"}, "chosen must be a non-empty string"),
    ({"user": "bob", "chosen": "b1", "rejected": "b2", "prompt": 3}, "prompt must be a string"),
    ({"user": "bob", "chosen": "yes", "rejected": "b2"}, "chosen matches 2 responses by text"),
])
def test_hostile_lines_are_problems_of_their_line(tmp_path, bad, message):
    f = _write(tmp_path, [GOOD, bad])
    _both_ways(f, message, 2)


def test_big_integer_user_is_an_id(tmp_path):
    big = 10 ** 300
    f = _write(tmp_path, [{"user": big, "chosen": "b1", "rejected": "b2"}])
    assert read_user_file(f, RESPONSES).pairs["user_id"].tolist() == [str(big)]


def test_missing_file_or_directory_is_one_error(tmp_path):
    with pytest.raises(DataError, match="no such user file"):
        read_user_file(tmp_path / "nope.jsonl", RESPONSES)
    with pytest.raises(DataError, match="is a directory"):
        read_user_file(tmp_path, RESPONSES, skip_invalid=True)


def test_many_users_are_read_in_linear_time(tmp_path):
    """Each user's lines are gathered once: 20,000 users with one pair each read in seconds."""
    import time

    f = _write(tmp_path, [{"user": f"n{i}", "chosen": "a1", "rejected": "a2"} for i in range(20_000)])
    t = time.perf_counter()
    uf = read_user_file(f, RESPONSES)
    assert len(uf.pairs) == 20_000 and time.perf_counter() - t < 10


def test_a_prompt_field_must_match_a_response_given_by_id(tmp_path):
    responses = pd.DataFrame({"response_id": ["a", "b", "c"], "prompt": ["p", "p", "q"], "text": ["A", "B", "C"]})
    f = tmp_path / "u.jsonl"
    f.write_text('{"user": "n", "chosen": "a", "rejected": "b", "prompt": "q"}\n'
                 '{"user": "n", "chosen": "a", "rejected": "b", "prompt": "p"}\n' + '{"user": "m", "chosen": ' + "1" * 5000 + '}\n')
    with pytest.raises(DataError, match="line 1: chosen is the id of a response to another prompt"):
        read_user_file(f, responses)
    uf = read_user_file(f, responses, skip_invalid=True)
    assert uf.pairs[["chosen_id", "rejected_id", "line"]].values.tolist() == [["a", "b", 2]]
    assert [s["line"] for s in uf.skipped_lines] == [1, 3] and "digits" in uf.skipped_lines[1]["reason"]
