"""Training data for stages: built-in tasks or users' local files, in TRL's dataset formats.

Local data may be JSONL, JSON, CSV, parquet, plain text (one document per line) or a directory
saved with ``datasets.Dataset.save_to_disk``; the columns decide the TRL format (``messages``,
``prompt``/``completion``, ``text``, ``prompt``/``chosen``/``rejected``). ``builtin:prose`` is
polm's synthetic plain text, for continued pretraining; ``builtin:pretraining`` the chat
documents ``builtin:tiny-base`` was pretrained on (``messages``), for replay. Nothing is
downloaded.
"""

from __future__ import annotations

from polm.errors import PolmError, user_path

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def task_dataset(tasks: list[str], fmt: str = "messages", n: int | None = None, seed: int = 0):
    """Built-in tasks' train splits rendered in ``fmt``, interleaved (shuffled with ``seed``)."""
    from datasets import Dataset

    from polm.tasks import render

    rows = [row for t in tasks for row in render(t, "train", fmt, n)]
    if any("tools" in row for row in rows):  # one column for every row (Arrow's schema)
        rows = [{**row, "tools": row.get("tools")} for row in rows]
    return Dataset.from_list(rows).shuffle(seed=seed) if len(tasks) > 1 else Dataset.from_list(rows)


def load_dataset_source(source: str, n: int | None = None):
    """A ``datasets.Dataset`` from a local file or directory, ``builtin:prose`` or
    ``builtin:pretraining``."""
    import datasets

    if source == "builtin:prose":
        from polm.corpus import prose

        ds = datasets.Dataset.from_dict({"text": prose("train", n or 20_000)})
        return ds
    if source == "builtin:pretraining":
        from polm.corpus import pretraining_documents

        chats = [d for d in pretraining_documents(2 * (n or 20_000)) if isinstance(d, list)]
        return datasets.Dataset.from_dict({"messages": chats[: n or 20_000]})
    path = user_path(source)
    if not path.exists():
        raise PolmError(
            f"dataset {source!r} not found: give a local JSONL/JSON/CSV/parquet/"
            "text file, a saved `datasets` directory, builtin:prose or builtin:pretraining."
        )
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"]
        elif path.suffix in LOADERS:
            ds = datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train")
        else:
            raise PolmError(
                f"dataset {path}: unsupported file type {path.suffix!r}; use one of "
                f"{', '.join(LOADERS)} or a saved datasets directory."
            )
    except PolmError:
        raise
    except Exception as e:  # datasets raises many error types for malformed files
        raise PolmError(f"cannot read dataset {path}: {str(e).splitlines()[0]}") from None
    if path.suffix == ".csv":
        # CSV has no types: a column of numbers ("42") would be read as ints, but text fields
        # must stay text
        ds = ds.cast(datasets.Features({c: datasets.Value("string") for c in ds.column_names}))
    return ds.select(range(min(n, len(ds)))) if n else ds


def check_columns(ds, source: str, accepted: list[set[str]]) -> None:
    cols = set(ds.column_names)
    if not any(need <= cols for need in accepted):
        raise PolmError(
            f"dataset {source} has columns {sorted(cols)}; expected one of the TRL "
            f"formats: {' | '.join('+'.join(sorted(a)) for a in accepted)}."
        )
