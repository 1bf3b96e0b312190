"""User code named by a string: ``"package.module:attribute"`` or ``"path/to/file.py:attribute"``.

One place for importing what a config names (reward functions, environments), with errors that
name the spec and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any


def _import_file(path_text: str, spec: str, kind: str, error: type[Exception]) -> Any:
    """Import a .py file as a module under a stable private name (so it can be pickled by name)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise error(
            f"{kind} {spec!r}: file {str(path)!r} does not exist; "
            "give an existing .py file as 'path/to/file.py:name' (relative to the working directory)"
        )
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"_posttrain_user_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{kind} {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as cause:
        del sys.modules[module_name]
        raise error(
            f"{kind} {spec!r}: importing {str(path)!r} failed with {type(cause).__name__}: {cause}"
        ) from cause
    return module


def _import_module(module_name: str, spec: str, kind: str, error: type[Exception]) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as cause:
        raise error(
            f"{kind} {spec!r}: cannot import module {module_name!r} ({cause}); "
            "install it or put its folder on PYTHONPATH, or give a file path 'path/to/file.py:name'"
        ) from cause
    except Exception as cause:
        raise error(
            f"{kind} {spec!r}: importing module {module_name!r} failed with {type(cause).__name__}: {cause}"
        ) from cause


def _names_a_file(module_part: str) -> bool:
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def spec_target(spec: str) -> str | None:
    """What importing ``spec`` would run: ``"file /abs/path.py"`` or ``"module pkg.mod"``; None when
    ``spec`` names no code (a built-in name, which has no ':')."""
    module_part, _, attribute = spec.strip().rpartition(":")
    if not module_part or not attribute or spec.startswith(UNSAVED):
        return None
    if _names_a_file(module_part):
        return f"file {Path(module_part).expanduser().resolve()}"
    return f"module {module_part}"


def load_from_spec(spec: str, *, kind: str, error: type[Exception], hint: str) -> tuple[str, Any]:
    """``(attribute name, object)`` for ``spec``; ``error(message)`` is raised on any failure.

    ``kind`` names what is loaded in messages ("reward function", "environment"); ``hint`` says
    what a valid spec looks like.
    """
    if spec.startswith(UNSAVED):
        raise error(
            f"{kind} {spec!r} was a Python lambda or nested function, which a saved config cannot name; "
            "define it at module level (or in a file, 'path/to/file.py:name') to resume or evaluate this run"
        )
    module_part, _, attribute = spec.strip().rpartition(":")
    if not module_part or not attribute:
        raise error(f"{kind} {spec!r} is malformed: {hint}")
    module = (
        _import_file(module_part, spec, kind, error)
        if _names_a_file(module_part)
        else _import_module(module_part, spec, kind, error)
    )
    if not hasattr(module, attribute):
        available = sorted(
            name
            for name, value in vars(module).items()
            if callable(value)
            and not name.startswith("_")
            and getattr(value, "__module__", None) == module.__name__
        )
        raise error(
            f"{kind} {spec!r}: {module_part!r} has no attribute {attribute!r}; "
            f"callables defined there: {available}"
        )
    return attribute, getattr(module, attribute)


UNSAVED = "<unsaved callable"


def spec_of(obj: Any) -> str:
    """The spec that names ``obj`` for ``load_from_spec``: ``"module:qualname"``, or
    ``"path/to/file.py:name"`` for a function of a script run as ``__main__``. A lambda or a nested
    function has no importable name: ``"<unsaved callable NAME>"``, which ``load_from_spec``
    refuses with a message saying so."""
    qualname = getattr(obj, "__qualname__", type(obj).__qualname__)
    module = getattr(obj, "__module__", None)
    if "<" in qualname or module is None:
        return f"{UNSAVED} {qualname}>"
    if module == "__main__" or module.startswith("_posttrain_user_"):
        source = inspect.getsourcefile(obj)
        return f"{source}:{qualname}" if source and Path(source).is_file() else f"{UNSAVED} {qualname}>"
    return f"{module}:{qualname}"
