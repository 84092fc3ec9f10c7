"""The progress helper of `seg predict` and `seg train`: a bar on a terminal, counted plain lines otherwise."""

import io

import pytest
from rich.console import Console

from seg.jobs.progress import Progress


def console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=120, color_system=None), out


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    con, out = console(terminal=False)
    with Progress(con, "images", 2) as progress:
        assert not progress.live and progress.sub("tiles", 40) is None
        progress.advance()
        progress.line("ok a.png")
        progress.advance()
        progress.line("failed b.png: unreadable", above_bar=True)
    assert out.getvalue().splitlines() == ["[1/2] ok a.png", "[2/2] failed b.png: unreadable"]


def test_no_bar_under_ci_even_on_a_terminal(monkeypatch):
    monkeypatch.setenv("CI", "1")
    con, out = console(terminal=True)
    with Progress(con, "images", 1) as progress:
        assert not progress.live
        progress.advance()
        progress.line("ok a.png")
    assert out.getvalue() == "[1/1] ok a.png\n"


@pytest.mark.parametrize("above_bar", [False, True])
def test_a_bar_with_a_second_one_on_a_terminal(monkeypatch, above_bar):
    monkeypatch.delenv("CI", raising=False)
    con, out = console(terminal=True)
    with Progress(con, "images", 3) as progress:
        assert progress.live
        tiles = progress.sub("  tiles of big.tif", 40)
        tiles(25)
        assert progress.bar.tasks[1].completed == 25
        progress.end_sub()
        assert len(progress.bar.tasks) == 1
        progress.advance()
        progress.line("failed b.png: unreadable", above_bar=above_bar)
        assert progress.bar.tasks[0].completed == 1
    text = out.getvalue()
    assert "images" in text and "[1/3]" not in text
    assert ("failed b.png: unreadable" in text) == above_bar  # only failures are printed over the bar


def test_field_columns_show_the_values_given(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    con, out = console(terminal=True)
    progress = Progress(con, "epoch 1/2", 4, "loss {task.fields[loss]:.4f}", loss=float("nan")).start()
    progress.advance(loss=0.25)
    progress.stop()
    assert "epoch 1/2" in out.getvalue() and "loss 0.2500" in out.getvalue()
