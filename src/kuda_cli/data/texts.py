"""Reading text sets: built-in JSONL files shipped with kuda, local files or directories
(JSONL, JSON, parquet, plain text), or hub datasets through `datasets.load_dataset`."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from kuda_cli.errors import ConfigError, UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
BLANK_READ = 1 << 20  # a file larger than this is not read to see whether it is blank


def refuse_blank_file(key: str, value: str) -> None:
    """Refuse a local file with nothing but white space in it, named by config key `key`: an
    empty file is never a data set, and read later it would fail far from its cause."""
    path = Path(value).expanduser()
    if path.is_file() and path.stat().st_size <= BLANK_READ and not path.read_bytes().strip():
        raise ConfigError(
            f"{key}={value} is empty; pass a file that holds at least one record "
            "(JSONL, JSON, parquet or txt)"
        )


def builtin_path(name: str) -> Path:
    path = Path(str(resources.files("kuda_cli.data") / "builtin" / "texts" / f"{name}.jsonl"))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise UserError(f"no built-in text set {name!r}; built-in sets: {', '.join(known)}")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL/JSON/parquet/txt file, or of every such file in a directory (sorted).
    A .txt file gives one record per blank-line-separated paragraph, under the key "text"."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{path} holds no {'/'.join(SUFFIXES)} files")
        return [record for f in files for record in read_records(f)]
    if not path.is_file():
        raise UserError(
            f"{path} does not exist; pass the path of a JSONL, JSON, parquet or txt file"
        )
    try:
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return data if isinstance(data, list) else data.get("data", [data])
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if path.suffix == ".txt":
            paragraphs = path.read_text().split("\n\n")
            return [{"text": p.strip()} for p in paragraphs if p.strip()]
    except (ValueError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    raise UserError(f"{path} has an unknown format; use one of {', '.join(SUFFIXES)}")


def hub_records(hub_id: str, config: str | None, split: str) -> list[dict[str, Any]]:
    return hub_dataset(hub_id, config, split).to_list()


def hub_dataset(hub_id: str, config: str | None, split: str):
    """The `datasets.Dataset` of a hub split (memory-mapped: rows can be read one at a time)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # datasets raises many types for offline, gated or missing sets
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        gated = "gated" in str(err).lower() or "401" in str(err)
        why = (
            "it is gated: request access on the hub and log in (hf auth login)"
            if gated
            else (first[:200])
        )
        raise UserError(
            f"could not load dataset {hub_id}"
            f"{'/' + config if config else ''} split {split} ({why}); download it "
            "where the hub is reachable and pass the local file with the matching .path= option"
        ) from err


def texts_of(records: list[dict[str, Any]], field: str, where: str) -> list[str]:
    if records and field not in records[0]:
        keys = ", ".join(records[0])
        raise UserError(
            f"{where}: records have no field {field!r} (fields: {keys}); set text_field"
        )
    return [r[field] for r in records if isinstance(r.get(field), str) and r[field].strip()]


def load_texts(
    *,
    source: str,
    builtin: str = "general",
    path: str | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    max_items: int | None = None,
) -> list[str]:
    if source == "builtin":
        records, where = read_records(builtin_path(builtin)), f"built-in set {builtin}"
    elif source == "path":
        if not path:
            raise UserError("source=path needs a path: pass ...path=FILE")
        records, where = read_records(path), str(path)
    elif source == "hub":
        if not hub_id:
            raise UserError("source=hub needs a hub_id: pass ...hub_id=ORG/NAME")
        records, where = hub_records(hub_id, hub_config, split), hub_id
    else:
        raise UserError(f"unknown text source {source!r}; use builtin, path or hub")
    texts = texts_of(records, text_field, where)
    if not texts:
        raise UserError(f"{where} has no non-empty texts in field {text_field!r}")
    return texts[:max_items] if max_items else texts
