"""One split of a dataset, from a local file (`path`, wins) or the hub, as a list of records."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kuda_cli.config import SplitSource
from kuda_cli.data.texts import hub_records, read_records
from kuda_cli.errors import UserError
from kuda_cli.hub import HubSource


def load_split(split: SplitSource, key: str, fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Records of `split` (config key `key`, e.g. data.verbmem), checked to carry `fields`."""
    if split.path:
        records = read_records(split.path)
        where = split.path
    elif split.hub_id:
        try:
            records = hub_records(split.hub_id, split.hub_config, split.split)
        except UserError as err:
            message = str(err).replace("the matching .path= option", f"{key}.path=FILE")
            raise UserError(f"{key}: {message}") from err
        where = split.hub_id
    else:
        raise UserError(f"{key} has neither a path nor a hub_id; pass {key}.path=FILE")
    if records:
        missing = [f for f in fields if f not in records[0]]
        if missing:
            raise UserError(
                f"{key} ({where}) records lack {', '.join(missing)}; fields: "
                f"{', '.join(records[0])}"
            )
    return records[: split.max_items] if split.max_items else records


def hub_splits(data: DictConfig, names) -> list[HubSource]:
    """Each split of `names` that comes from the hub (no path)."""
    found = []
    for name in dict.fromkeys(names):
        split = data.get(name)
        if isinstance(split, DictConfig) and split.get("hub_id") and not split.get("path"):
            found.append(HubSource(f"data.{name}", split.hub_id, f"data.{name}.path=FILE"))
    return found
