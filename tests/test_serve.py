"""`coplctl serve`: the reward server over loopback, with a real uvicorn server and a real HTTP client."""

from __future__ import annotations

import numpy as np
import pytest
from test_api import train

import coplctl
from coplctl.data import load as load_data

uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'coplctl[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")


@pytest.fixture(scope="module")
def served(micro_dir, tmp_path_factory):
    from coplctl.serving.server import in_background, make_app

    run = train("i2e", micro_dir, tmp_path_factory.mktemp("serve") / "run")
    rm = coplctl.load(run)
    with in_background(make_app(rm, max_batch=4, max_body_bytes=4000)) as url:
        yield url, rm


def test_rewards_health_and_info_over_http(served, micro_dir):
    url, rm = served
    ds = load_data(micro_dir)
    r = ds.responses.iloc[:3]
    users = ds.user_ids("seen")[:3]
    items = [{"user": u, "prompt": p, "response": t} for u, p, t in zip(users, r["prompt"], r["text"])]
    with httpx.Client(base_url=url, timeout=30) as client:
        got = client.post("/reward", json={"items": items})
        assert got.status_code == 200, got.text
        assert np.allclose(got.json()["rewards"], rm.reward(users, r["prompt"].tolist(), r["text"].tolist()), atol=1e-6)
        assert client.get("/health").json() == {"status": "ok"}
        info = client.get("/info").json()
        assert info["method"] == "i2e" and info["users"] == len(rm.users) and info["max_batch"] == 4
        assert info["mode"] == "frozen" and info["version"] == coplctl.__version__


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b'[{"user": "u00"}]', 400, "must be a JSON object"),
    (b'{"items": []}', 422, "items is empty"),
    (b'{"items": [{"user": "u00", "prompt": "p"}]}', 422, "items[0].response is missing"),
    (b'{"items": [{"user": "u00", "prompt": "p", "response": 5}]}', 422, "items[0].response must be a text"),
    (b'{"items": [{"user": "nobody", "prompt": "p", "response": "r"}]}', 422, "unknown user 'nobody'"),
    (b'{"items": [' + b",".join([b'{"user": "u00", "prompt": "p", "response": "r"}'] * 5) + b"]}", 413, "max batch of 4"),
    (b'{"items": [{"user": "u00", "prompt": "p", "response": "' + b"x" * 5000 + b'"}]}', 413, "over this server's limit"),
])
def test_bad_requests_get_a_clear_4xx(served, body, status, message):
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        got = client.post("/reward", content=body, headers={"content-type": "application/json"})
        assert got.status_code == status and message in got.json()["error"], got.text
        assert client.get("/reward").status_code == 405


def test_the_command_serves_until_interrupted(micro_dir, tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import time

    run = train("uniform", micro_dir, tmp_path / "run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "coplctl", "serve", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        assert health.json() == {"status": "ok"}
        got = httpx.post(f"http://127.0.0.1:{port}/reward", timeout=30,
                         json={"items": [{"user": "anyone", "prompt": "p", "response": "r"}]})
        assert got.status_code == 200 and len(got.json()["rewards"]) == 1  # Uniform: every user
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130) and "serving uniform" in err


def test_a_lone_surrogate_is_a_422_and_a_client_that_leaves_mid_body_logs_nothing(served, micro_dir):
    import logging
    import socket
    import time
    from urllib.parse import urlsplit

    url, _ = served
    user = load_data(micro_dir).user_ids("seen")[0]
    body = '{"items": [{"user": "%s", "prompt": "Hi \\ud800", "response": "ok"}]}' % user
    with httpx.Client(base_url=url, timeout=30) as client:
        got = client.post("/reward", content=body, headers={"content-type": "application/json"})
    assert got.status_code == 422 and "items[0].prompt holds a lone surrogate" in got.json()["error"]
    host = urlsplit(url)
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record)
    logging.getLogger("uvicorn.error").addHandler(handler)  # where uvicorn reports an exception in the app
    with socket.create_connection((host.hostname, host.port)) as s:  # promises 1,000 bytes, sends 10, leaves
        s.sendall(b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000"
                  b"\r\n\r\n{\"items\":")
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
    time.sleep(1.5)  # the server notices the disconnect and finishes that request
    logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]


def test_unknown_routes_and_methods_answer_json(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        missing, wrong = client.get("/nope"), client.get("/reward")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"} and "POST" in wrong.headers["allow"]


def test_openrlhfs_remote_reward_client_gets_the_runs_rewards(served, micro_dir):
    """The request OpenRLHF's remote_rm_fn posts (openrlhf/utils/remote_rm_utils.py): requests.post with
    {"query", "prompts", "labels"}, reading "rewards"; here the label carries the user id."""
    requests = pytest.importorskip("requests")
    url, rm = served
    ds = load_data(micro_dir)
    r = ds.responses.iloc[:3]
    users = ds.user_ids("seen")[:3]
    prompts = [f"Human: {p}\n\nAssistant: " for p in r["prompt"]]
    data = {"query": [p + t for p, t in zip(prompts, r["text"])], "prompts": prompts, "labels": users}
    got = requests.post(url=url + "/reward", json=data, headers={"Content-Type": "application/json"}, timeout=180)
    got.raise_for_status()
    body = got.json()
    assert np.allclose(body["rewards"], rm.reward(users, prompts, r["text"].tolist()), atol=1e-6)
    assert body["scores"] == body["rewards"]
    bad = requests.post(url=url + "/reward", json={"query": data["query"], "prompts": prompts[::-1],
                                                    "labels": users}, timeout=180)
    assert bad.status_code == 422 and "query[0] does not start with prompts[0]" in bad.json()["error"]
    no_labels = requests.post(url=url + "/reward", json={"query": data["query"], "prompts": prompts}, timeout=180)
    assert no_labels.status_code == 422 and "--label_key" in no_labels.json()["error"]


def _start(args, port):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "coplctl", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
    raise AssertionError("the server did not start")


def _stop(proc) -> str:
    import signal

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    return err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_users_posted_by_8_concurrent_clients_are_served_at_once_and_after_a_restart(micro_dir, tmp_path):
    """POST /users adapts new users (CoPL's GCF placement), /reward scores them at once, the overlay keeps them
    beside the run (never rewriting it) and a restarted server scores them the same."""
    import hashlib
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    run = train("copl", micro_dir, tmp_path / "run")
    trained = {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in run.rglob("*")
               if p.is_file()}
    ds = load_data(micro_dir)
    by_prompt = ds.responses.groupby("prompt")["response_id"].apply(list)
    ids = [r for r in by_prompt if len(r) >= 2]
    port = _free_port()
    proc = _start([str(run), "--max-user-pairs", "3"], port)
    base = f"http://127.0.0.1:{port}"

    def client(i: int) -> tuple[int, int, list]:
        (a, b), (c, d) = ids[(2 * i) % len(ids)][:2], ids[(2 * i + 1) % len(ids)][:2]
        pairs = [{"user": f"new{i}", "chosen": a, "rejected": b}, {"user": f"new{i}", "chosen": d, "rejected": c}]
        with httpx.Client(base_url=base, timeout=60) as h:
            added = h.post("/users", json={"pairs": pairs})
            scored = h.post("/reward", json={"items": [{"user": f"new{i}", "prompt": "Hi?", "response": "Hello!"}]})
        return added.status_code, scored.status_code, scored.json().get("rewards")

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(client, range(8)))
        assert [(a, s) for a, s, _ in results] == [(200, 200)] * 8, results
        first = [r for _, _, r in results]
        with httpx.Client(base_url=base, timeout=60) as h:
            info = h.get("/info").json()
            assert info["users"] == len(ds.user_ids("seen")) + 8
            again = h.post("/users", json={"pairs": [{"user": "new0", "chosen": ids[0][0], "rejected": ids[0][1]}]})
            assert again.status_code == 422 and "new0" in again.json()["error"]
            bad = h.post("/users", json={"pairs": [{"user": "x", "chosen": "no-such-id", "rejected": ids[0][1]}]})
            assert bad.status_code == 422 and "pairs row 0" in bad.json()["error"], bad.text
            many = h.post("/users", json={"pairs": [{"user": "y", "chosen": ids[k][0], "rejected": ids[k][1]} for k in range(4)]})
            assert many.status_code == 413 and "limit of 3" in many.json()["error"]
            assert h.get("/users").status_code == 405 and "error" in h.get("/users").json()
        second = subprocess.run([sys.executable, "-m", "coplctl", "serve", str(run), "--port", str(_free_port())],
                                capture_output=True, text=True, timeout=120)  # one server per overlay
        assert second.returncode == 1 and "in use" in second.stderr and "Traceback" not in second.stderr
    finally:
        _stop(proc)
    assert len(list((run / "served-users").glob("*.jsonl"))) == 8  # refused requests left no file
    assert {str(p.relative_to(run)): hashlib.sha1(p.read_bytes()).hexdigest() for p in run.rglob("*")
            if p.is_file() and "served-users" not in p.parts} == trained  # the trained run is untouched
    proc = _start([str(run)], port)
    try:
        with httpx.Client(base_url=base, timeout=60) as h:
            after = [h.post("/reward", json={"items": [{"user": f"new{i}", "prompt": "Hi?", "response": "Hello!"}]})
                     .json()["rewards"] for i in range(8)]
    finally:
        err = _stop(proc)
    assert "8 stored users" in " ".join(err.split())
    assert np.allclose(after, first, atol=1e-6)
    assert len({round(r[0], 6) for r in first}) > 1  # the users differ: not one shared reward
