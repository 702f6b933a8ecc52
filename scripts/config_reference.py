"""Writes docs/config.md, the reference of every config group, option and key, generated from
what defines them: the schema dataclasses (each field's type, default, the constraints
`kuda_cli.validate` checks, and the comment written beside or above it) and the YAML options in
conf/ (each option's leading comment). Schemas are found as Hydra's ConfigStore gets them
(`kuda_cli.compose.all_schemas`: plug-ins through their registries), groups as conf/'s folders,
so a new method, metric, attack, data kind, group or key appears on the next run.

    python scripts/config_reference.py           # rewrite docs/config.md (make docs-config)
    python scripts/config_reference.py --check   # exit 1, one line, when it is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import sys
import typing
from functools import cache, partial
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING

from field_comments import field_comment
from kuda_cli.compose import all_schemas, conf_dir

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"
COMMAND = "make docs-config"  # (python scripts/config_reference.py)
SHOWN = 10  # keys an option sets shown in its row: the YAML has the rest
BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # kuda_cli.validate's words


# ----------------------------------------------------------------------------- one field
def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@cache
def type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: read as written
        return {}


def nested_schema(cls: type, f: dataclasses.Field) -> type | None:
    """The dataclass a field holds (a sub-config), if it holds one."""
    default = default_of(f)
    if dataclasses.is_dataclass(default):
        return type(default)
    hint = type_hints(cls).get(f.name, f.type)
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def type_name(f: dataclasses.Field, nested: type | None) -> str:
    if isinstance(f.type, str):
        return f.type
    if nested is not None:
        return nested.__name__
    return f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")


def shown(value: Any) -> str:
    """A value as it is written in YAML or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    return repr(value)


def default_cell(f: dataclasses.Field, nested: type | None) -> str:
    value = default_of(f)
    if value == MISSING:
        return "*required*"
    if nested is not None and value is not None:
        return "(table)"
    return f"`{shown(value)}`"


def allowed_cell(f: dataclasses.Field) -> str:
    """What `kuda_cli.validate` accepts, from the field's metadata."""
    meta = f.metadata
    parts = []
    if "choices" in meta:
        parts.append(", ".join(f"`{shown(c)}`" for c in meta["choices"]))
    bounds = [f"{word} {shown(meta[k])}" for k, word in BOUNDS.items() if k in meta]
    if bounds:
        parts.append(" and ".join(bounds))
    if "allowed" in meta:
        parts.append(meta["allowed"])
    if meta.get("min_items"):
        parts.append(f"at least {meta['min_items']} item{'s' if meta['min_items'] > 1 else ''}")
    if meta.get("distinct"):
        parts.append("no item twice")
    if "why" in meta and parts:
        parts[-1] += f" ({meta['why']})"
    return "; ".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- tables
def anchor(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.lower())


def heading_anchor(text: str) -> str:
    """The anchor GitHub gives a heading: punctuation other than '-' and '_' dropped."""
    return "".join(c for c in text.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def schema_table(
    cls: type, prefix: str, keep=lambda f: True, groups=(), tag: str = "", seen=None
) -> list[str]:
    """The table of a schema's fields (those `keep` accepts) with their dotted paths, then a
    table for each sub-config (one per dataclass: another field holding it points there);
    `groups`: fields that are config groups, documented in their own section; `tag`: what
    makes the anchors unique on the page."""
    seen = {} if seen is None else seen
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    below: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        if not keep(f):
            continue
        path, meaning = f"{prefix}{f.name}", field_comment(cls, f.name)
        nested = nested_schema(cls, f)
        if f.name in groups:
            rows.append(f"| `{path}` | group | | | the options of [{path}](#{anchor(path)}) |")
            continue
        if nested is not None:
            first = seen.setdefault(nested, path)
            below += [(path, nested)] if first == path else []
            link = f"{'Its keys' if first == path else 'Keys as'} [{first}](#{anchor(tag + first)})"
            meaning = f"{meaning.rstrip('.')}. {link}." if meaning else f"{link}."
        row = [f"`{path}`", cell(type_name(f, nested)), default_cell(f, nested)]
        rows.append("| " + " | ".join([*row, cell(allowed_cell(f)), cell(meaning)]) + " |")
    lines = rows + [""]
    for path, nested in below:
        lines += [f'<a id="{anchor(tag + path)}"></a>', "", f"#### `{path}`", ""]
        lines += [cell(docstring(nested)), ""] if docstring(nested) else []
        lines += schema_table(nested, f"{path}.", tag=tag, seen=seen)
    return lines


def docstring(cls: type) -> str:
    """The class's docstring on one line; none for the one dataclass makes from the signature."""
    doc = cls.__doc__ or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(inspect.cleandoc(doc).split())


def differs(f: dataclasses.Field, shared: dict[str, dataclasses.Field]) -> bool:
    """Whether a field is not the shared base's as it is (new, or another type, default or
    constraint)."""
    base = shared.get(f.name)
    if base is None:
        return True
    mine, its = (type_name(f, None), f.metadata), (type_name(base, None), base.metadata)
    return mine != its or default_of(f) != default_of(base)


# ----------------------------------------------------------------------------- conf/
def leading_comment(text: str) -> str:
    """An option's description: its first comment lines (an indented one, an example, as code)."""
    said = ""
    for line in text.splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        body = line[1:]
        body = f"`{' '.join(body.split())}`" if body.startswith("   ") else body.strip()
        said += body if said.endswith("/") or not said else f" {body}"
    return said


def flat(node: Any, prefix: str = "") -> list[str]:
    """`key=value` for each leaf an option sets."""
    found = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            found += flat(value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}={shown(value)}")
    return found


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def option_facts(path: Path) -> tuple[str, str | None, list[str]]:
    """(description, the schema it starts from, what it sets) of one option's YAML."""
    text = path.read_text()
    option = load_yaml(text) or {}
    schema, sets = None, []
    for entry in option.get("defaults") or []:
        if isinstance(entry, str) and entry.startswith("/schema/"):
            schema = entry.split("@")[0].rsplit("/", 1)[1]
        elif isinstance(entry, dict):
            sets += [f"{k.removeprefix('override ').strip('/')}={v}" for k, v in entry.items()]
    sets += flat({k: v for k, v in option.items() if k != "defaults"})
    return leading_comment(text), schema, sets


# ----------------------------------------------------------------------------- the page
def group_schemas() -> dict[str, dict[str, type]]:
    """Group ("" for the root) -> schema name -> schema, as the ConfigStore gets them."""
    found: dict[str, dict[str, type]] = {}
    for (store_group, name), cls in all_schemas().items():
        if cls is None:  # a plug-in without settings
            continue
        found.setdefault(store_group.removeprefix("schema").strip("/"), {})[name] = cls
    return found


def root_defaults() -> dict[str, Any]:
    defaults = load_yaml((conf_dir() / "config.yaml").read_text())["defaults"]
    return {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}


def groups_in_order(schemas: dict[str, dict[str, type]]) -> list[str]:
    """conf/'s folders of options and the schemas' groups: config.yaml's order, then by name."""
    conf = conf_dir()
    found = {str(p.parent.relative_to(conf)) for p in conf.rglob("*.yaml") if p.parent != conf}
    found |= set(schemas) - {""}
    listed = [g for g in root_defaults() if g in found]
    return listed + sorted(found - set(listed))


def group_options(group: str) -> dict[str, tuple[str, str | None, list[str]]]:
    """Option -> (description, the schema it starts from, what it sets)."""
    return {p.stem: option_facts(p) for p in sorted((conf_dir() / group).glob("*.yaml"))}


def options_table(group: str, options: dict) -> list[str]:
    default = root_defaults().get(group)
    rows = ["| option | starts from | description | sets |", "|---|---|---|---|"]
    for option, (said, schema, sets) in options.items():
        name = f"`{option}`" + (" (default)" if option == default else "")
        more = f", ... ({len(sets) - SHOWN} more)" if len(sets) > SHOWN else ""
        sets_cell = ", ".join(f"`{cell(s)}`" for s in sets[:SHOWN]) + more
        rows.append(f"| {name} | {f'`{schema}`' if schema else ''} | {cell(said)} | {sets_cell} |")
    return [*rows, ""]


def shared_base(schemas: list[type]) -> type | None:
    """The nearest dataclass every schema of a group extends, if there is one."""
    for base in schemas[0].__mro__[1:]:
        if dataclasses.is_dataclass(base) and all(issubclass(s, base) for s in schemas):
            return base
    return None


def schemas_section(group: str, schemas: dict[str, type], options: dict) -> list[str]:
    """One schema: its table. Several: the keys they share, then each one's own."""
    prefix = f"{group}."
    if len(schemas) == 1:
        (cls,) = schemas.values()
        return [f"### Keys (`{cls.__name__}`)", "", *_doc_lines(cls), *schema_table(cls, prefix)]
    lines, base = [], shared_base(list(schemas.values()))
    shared = {f.name: f for f in dataclasses.fields(base)} if base else {}
    if base is not None:
        lines += [f"### Keys every `{group}` schema shares (`{base.__name__}`)", ""]
        lines += [*_doc_lines(base), *schema_table(base, prefix, tag="shared-")]
    for name, cls in schemas.items():
        lines += [f"### `{group}` schema `{name}` (`{cls.__name__}`)", "", *_doc_lines(cls)]
        starting = ", ".join(f"`{o}`" for o, facts in options.items() if facts[1] == name)
        lines += [f"Options starting from it: {starting}.", ""] if starting else []
        if base is not None:
            lines += ["Its own keys, and the shared ones it sets otherwise:", ""]
        lines += schema_table(cls, prefix, keep=partial(differs, shared=shared), tag=f"{name}-")
    return lines


def _doc_lines(cls: type) -> list[str]:
    return [cell(docstring(cls)), ""] if docstring(cls) else []


def group_section(group: str, schemas: dict[str, type]) -> list[str]:
    lines = [f'<a id="{anchor(group)}"></a>', "", f"## `{group}`", ""]
    options = group_options(group)
    if options:
        lines += [f"Options (`conf/{group}/`, chosen with `{group}=OPTION`):", ""]
        lines += options_table(group, options)
    if schemas:
        return lines + schemas_section(group, schemas, options)
    return lines + ["No kuda schema: each option's keys belong where it puts them (*sets*).", ""]


def root_section(schemas: dict[str, type], groups: list[str]) -> list[str]:
    config = load_yaml((conf_dir() / "config.yaml").read_text())
    sets = flat({k: v for k, v in config.items() if k not in ("defaults", "hydra")})
    lines = ["## Top-level keys", ""]
    lines += [f"`conf/config.yaml` sets {', '.join(f'`{cell(s)}`' for s in sets)}.", ""]
    for cls in schemas.values():
        lines += schema_table(cls, "", groups=groups)
    return lines


HEADER = f"""# Configuration reference

<!-- Generated by scripts/config_reference.py: edit the schemas and conf/, then {COMMAND}. -->

Generated from the schema dataclasses and the YAML options in `conf/` by `{COMMAND}`
(`python scripts/config_reference.py`); do not edit it by hand: change the schema (a default,
a bound, the comment beside a field) or the option's leading comment, and run it again.
`tests/test_config_reference.py` fails while this page is out of date.

Set any key on the command line, `kuda STAGE key=value`, and pick an option of a group with
`group=option`; `kuda STAGE --cfg job` prints the composed config. Every key is checked before
any work (`kuda_cli.validate`): *allowed* lists the choices, bounds and list rules a value must
meet, a float must also be finite, and a type with `| None` takes `null`. *required*: no default,
the option or the command line sets it.
"""


def render() -> str:
    schemas = group_schemas()
    groups = groups_in_order(schemas)
    lines = [HEADER, "Sections: [top-level keys](#top-level-keys)"]
    lines[-1] += "".join(f", [`{g}`](#{heading_anchor(g)})" for g in groups) + "."
    lines += ["", *root_section(schemas.get("", {}), groups)]
    for group in groups:
        lines += group_section(group, schemas.get(group, {}))
    return "\n".join(lines).rstrip() + "\n"


def difference(old: str, new: str) -> str:
    """One line: how many lines differ, and the first."""
    changed = [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    first = next(iter(changed), "")[:100]
    return f"{len(changed)} lines differ, first: {first}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is stale")
    args = parser.parse_args(argv)
    page = render()
    current = PAGE.read_text() if PAGE.is_file() else ""
    if args.check:
        if current == page:
            return 0
        shown_path = os.path.relpath(PAGE)
        print(f"{shown_path} is out of date ({difference(current, page)}); run {COMMAND}")
        return 1
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
