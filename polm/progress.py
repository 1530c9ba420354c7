"""What a person sees while stages run: per stage, one rich progress bar (steps, loss, ETA) and
one result line. Everything else, the libraries' own progress bars, warnings and log records,
goes to the stage's log file; ``-v`` / ``--verbose`` shows it all instead.

The quiet mode redirects file descriptors 1 and 2 (not just ``sys.stdout``): GPTQModel, the ONNX
builder and mergekit write from native code and worker threads, which no Python-level setting
reaches. The bar itself writes to a duplicate of the terminal's stderr taken before that.

Stages report through :func:`current`: ``None`` when they run outside ``polm run`` or a stage
command (a library call, a test), so nothing here changes what they do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

_current: StageProgress | None = None

# Libraries whose INFO records are noise at the front door (they still reach the log file).
NOISY_LOGGERS = (
    "transformers",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "mergekit",
    "gptqmodel",
    "tokenicer",
    "optimum",
    "onnxruntime",
    "torchao",
    "llama-cpp-python",  # llama.cpp's own log (model loading, the quantizer), through its callback
    "bentoml",
)


class StageProgress:
    """One stage's bar. ``start`` sets what is counted (training steps, a phase without a known
    length); ``update`` moves it and shows the latest loss."""

    def __init__(self, console, label: str):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.label = label
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[label]}[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,  # piped or logged: the result lines say it all
            # rich would route Python's stdout and stderr through the bar, onto the terminal:
            # they go to the log with everything else
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task = self.progress.add_task("", total=None, label=label, loss="")

    def start(self, description: str, total: int | None = None) -> None:
        self.progress.reset(
            self.task, total=total, description=description, label=self.label, loss=""
        )

    def update(self, completed: int | None = None, loss: float | None = None) -> None:
        fields = {} if loss is None else {"loss": f"loss {loss:.4f}"}
        self.progress.update(self.task, completed=completed, **fields)


def current() -> StageProgress | None:
    """The bar of the stage running now, or None outside the CLI."""
    return _current


def report(description: str, completed: int, total: int | None, loss: float | None = None):
    """Move the running stage's bar (a no-op outside the CLI): for loops polm runs itself."""
    if _current is None:
        return
    if _current.progress.tasks[0].description != description:
        _current.start(description, total)
    _current.update(completed, loss)


def trainer_callback():
    """A transformers TrainerCallback that drives the stage's bar from a Trainer's state."""
    from transformers import TrainerCallback

    class StageBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            report("training", state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            report("training", state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and isinstance(logs.get("loss"), (int, float)):
                report("training", state.global_step, state.max_steps, loss=logs["loss"])

    return StageBar()


@contextlib.contextmanager
def _redirected(log_path: Path):
    """File descriptors 1 and 2, and Python's warnings and log records, into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log, warnings.catch_warnings():
        warnings.simplefilter("default")  # every warning once per place, into the log
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
        _at_least(logging.WARNING)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def stage_output(console, label: str, log_path: Path | None):
    """Run a stage under one progress bar with its other output in ``log_path``; without a
    log path (verbose), show everything and no bar."""
    global _current
    if log_path is None:
        yield None
        return
    from rich.console import Console

    # the bar draws on the terminal as it was before the redirection
    term = Console(file=os.fdopen(os.dup(console.file.fileno()), "w"), stderr=True)
    bar = StageProgress(term, label)
    with _redirected(log_path):
        _current = bar
        bar.progress.start()
        try:
            yield bar
        finally:
            _current = None
            bar.progress.stop()
            term.file.close()


def quiet_libraries() -> None:
    """Progress bars and INFO logs of the libraries off for this process (the stage's own bar
    replaces them); called once by the CLI when not verbose."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # A root handler at WARNING first: GPTQModel's tokenicer calls logging.basicConfig(level=INFO)
    # when imported, which would otherwise print every library's INFO records (matplotlib's
    # "generated new fontManager" on a first report); with a handler present it does nothing.
    logging.basicConfig(level=logging.WARNING)
    _at_least(logging.WARNING)


def _at_least(level: int) -> None:
    """Raise the noisy libraries' log levels to ``level``; never lower one (polm silences
    torchao's CUDA-kernel warnings altogether)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)
