"""Reading what a user typed into a config: YAML files, ``--set key=value`` items, and pydantic's
complaints about them, each turned into a ``ConfigError`` that names the file, line and column, or
the override, or the key, and says what to do (never a PyYAML or pydantic traceback).

Two things PyYAML accepts silently are refused: a key given twice in one mapping (PyYAML keeps the
last one, so the first is ignored without a word), and a file that is not UTF-8.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

_MERGE_TAG = "tag:yaml.org,2002:merge"

# PyYAML's wording of a problem -> what usually causes it
_HINTS = {
    "found character '\\t'": "indent with spaces, not tabs",
    "mapping values are not allowed here": "quote a value that contains ': ', or check the indentation",
    "could not find expected ':'": "write `key: value`, one per line",
    "expected <block end>": "check the indentation: keys of one section line up",
    "could not determine a constructor": "only plain YAML is read: no !!python or custom tags",
    "found undefined alias": "define the &anchor before using *alias",
    "expected a single document": "one config per file: drop the extra '---'",
    "is given twice": "keep one of them",
    "while scanning a quoted scalar": "close the quote",
    "while parsing a flow": "close the { or [, or quote the whole value",
}


class ConfigError(ValueError):
    """A config that cannot be run; the message names the key (or file and line) and the fix."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (``<<`` merges may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own check names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping (first on line {first + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _hint(problem: str) -> str:
    return next((f"; {hint}" for text, hint in _HINTS.items() if text in problem), "")


def _describe(error: yaml.YAMLError, text: str, source: str, with_line: bool) -> str:
    """``source: line L, column C: problem; hint`` for any PyYAML error (no line with ``with_line``
    False: a one-line ``--set`` value)."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow (e.g. NUL)
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        return f"{source}: line {line}, column {column}: character U+{code:04X} is not allowed in YAML; remove it"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = ""
    if mark is not None:
        where = (f"line {mark.line + 1}, " if with_line else "") + f"column {mark.column + 1}: "
    what = f"{problem} ({context})" if context else problem
    return f"{source}: {where}{what}{_hint(what)}"


def parse_yaml(text: str, source: str, *, with_line: bool = True) -> Any:
    """The value ``text`` holds; ``ConfigError`` naming ``source``, line and column if it is not YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(_describe(error, text, source, with_line)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config") from None


def read_yaml_file(path: Path) -> Any:
    """The value a YAML file holds; ``ConfigError`` for a file that cannot be read, is not UTF-8
    (naming the line and column of the first bad byte) or is not YAML."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is fine
    except UnicodeDecodeError as error:
        start = error.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ConfigError(
            f"{path}: line {line}, column {column}: byte {data[start]:#04x} is not UTF-8; save the file "
            "as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return parse_yaml(text, str(path))


# ----------------------------------------------------------------------------- --set items


def _set_dotted(tree: dict[str, Any], item: str, dotted: str, value: Any) -> None:
    """Put ``value`` at ``section.sub.key`` in ``tree``; ``item`` is the ``--set`` it came from."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(
            f"--set {item!r}: {dotted!r} is not a key; write section.key=value, e.g. rollout.group_size=8"
        )
    *parents, leaf = parts
    node = tree
    for depth, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"--set {item!r}: an earlier --set gave {section} the value {node!r}, so it has no keys; "
                f"drop one of the two"
            )
    node[leaf] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["rollout.group_size=8", "algorithm=ppo"]`` -> nested dict; values are parsed as YAML.
    A malformed item is a ``ConfigError`` naming it."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set rollout.group_size=8")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"--set {item!r}, value {raw!r}", with_line=False)
        _set_dotted(tree, item, key.strip(), value)
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` on top, section by section (``--set`` items over a file's values)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- validation messages


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys of the section that holds ``loc`` (e.g. RolloutConfig's for ``rollout.group_sise``)."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = model.model_fields.get(str(part))
        inner = field and _section_type(field.annotation)
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside ``annotation`` (``GuardConfig | None``, ``list[GuardRuleConfig]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_type, typing.get_args(annotation))), None)


def _item_message(root: type[BaseModel], item: Any) -> str:
    """One pydantic error as a sentence; our own messages are used as they are."""
    if item["type"] == "value_error" and "error" in item.get("ctx", {}):
        return str(item["ctx"]["error"])  # our own message, without pydantic's prefix
    if item["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(item["loc"][-1]), _fields_at(root, item["loc"]), n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key ({guess}check the spelling; see `posttrain train --print-config`)"
    if item["type"] == "finite_number":
        return f"must be a finite number (not inf or NaN), got {item['input']!r}"
    given = item.get("input")
    if item["type"] == "string_type" and given is not None:
        # YAML reads 2024-01-01 as a date and 007 as a number
        return f"must be text, got {given!r} ({type(given).__name__}); quote it in YAML"
    if isinstance(given, dict | BaseModel) or len(repr(given)) > 60:
        return str(item["msg"])
    return f"{item['msg']}, got {given!r}"


def format_validation_error(error: ValidationError, root: type[BaseModel]) -> str:
    """``invalid config:`` and one line per problem, each naming its key; ``root`` is the config class."""
    lines = ["invalid config:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = _item_message(root, item)
        # a check of a whole section (or config) names its keys in its message: "data.task: ..."
        lines.append(f"  {message}" if message.startswith(key) else f"  {key}: {message}")
    return "\n".join(lines)
