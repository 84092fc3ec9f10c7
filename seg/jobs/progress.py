"""Progress on the console for `seg predict` and `seg train`: a rich bar on a terminal, plain lines otherwise.

No bar is drawn when the console is not a terminal or under CI (`$CI` set); `live` is then False and the
caller's lines come out one per item, counted as "[done/total] ...".
"""

from __future__ import annotations

import os
from typing import Callable

from rich.console import Console
from rich.text import Text


class Progress:
    """One bar over `total` items, and at times a second one under it (the tiles of a large image).

    `fields` is extra column text drawn from the values given to `advance`, e.g. "loss {task.fields[loss]:.4f}"
    with `loss=float("nan")` as the starting value. The bar is transient: it is gone once stopped.
    """

    def __init__(self, console: Console, label: str, total: int, fields: str = "", **values):
        self.console, self.total, self.done = console, total, 0
        self.values = values
        self.bar = None
        self.sub_task = None
        if console.is_terminal and not os.environ.get("CI"):
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            columns += [TextColumn(fields)] if fields else []
            self.bar = Bar(*columns, TimeRemainingColumn(), console=console, transient=True)
            self.task = self.bar.add_task(label, total=total, **values)

    @property
    def live(self) -> bool:
        """Whether a bar is drawn."""
        return self.bar is not None

    def start(self) -> "Progress":
        if self.bar:
            self.bar.start()
        return self

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()

    def __enter__(self) -> "Progress":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def advance(self, n: int = 1, **values) -> None:
        """`n` more items done; `values` update the `fields` columns."""
        self.done += n
        if self.bar:
            self.bar.update(self.task, advance=n, **values)

    def sub(self, label: str, total: int) -> Callable[[int], None] | None:
        """A second bar under the first (replacing an earlier one); returns its advance(n), or None without a bar."""
        if self.bar is None:
            return None
        self.end_sub()
        self.sub_task = task = self.bar.add_task(label, total=total, **self.values)
        return lambda n: self.bar.update(task, advance=n)

    def end_sub(self) -> None:
        if self.bar is not None and self.sub_task is not None:
            self.bar.remove_task(self.sub_task)
            self.sub_task = None

    def line(self, text: str | Text, above_bar: bool = False) -> None:
        """Print "[done/total] text" where no bar is drawn; over a bar only when `above_bar`, without the count."""
        text = Text(text) if isinstance(text, str) else text
        if self.bar is None:
            self.console.print(Text(f"[{self.done}/{self.total}] ") + text, soft_wrap=True)
        elif above_bar:
            self.console.print(text, soft_wrap=True)
