"""The progress bar leaves plain lines in a log when stderr is not a terminal."""

from coplctl.core import progress


def test_bar_logs_lines_when_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.Bar(True, 3, "bench")
    bar.update(completed=1, info="copl seed 0: train")
    bar.update(advance=1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("bench 1/3") and line.endswith("copl seed 0: train") for line in lines)
    assert any(line.startswith("bench 2/3") for line in lines)


def test_disabled_bar_prints_nothing(capsys):
    bar = progress.Bar(False, 3, "bench")
    bar.update(advance=1, info="x")
    bar.close()
    assert capsys.readouterr().err == ""


def test_a_bar_with_no_update_still_logs_while_work_goes_on(monkeypatch, capsys):
    """A benchmark's bar moves between jobs only; inside a long job (embedding, GCF, training) the heartbeat
    keeps a plain line coming every LOG_EVERY_S."""
    import time

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.5)
    bar = progress.Bar(True, 7, "quick")
    bar.update(completed=0, info="copl seed 0: embedding")
    time.sleep(2.2)  # no update: the job is busy
    bar.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("quick 0/7")]
    assert len(lines) >= 2 and all(line.endswith("copl seed 0: embedding") for line in lines), lines
