"""Hiding installed modules, so that the suite can prove it passes on a machine without them.

``DEFORMUX_HIDE_MODULES=torch,nibabel,safetensors,monai python3 -m pytest python/tests`` makes every
import of those packages (and of their submodules) raise ModuleNotFoundError, as on a fresh machine,
even where they are installed. conftest.py installs the finder before any test module is imported;
scripts/test runs the suite a second time this way whenever one of them is importable.
"""
import importlib.abc
import os
import sys

ENV = "DEFORMUX_HIDE_MODULES"


class HiddenModuleFinder(importlib.abc.MetaPathFinder):
    """A meta-path finder, first on sys.meta_path, that refuses the top-level packages `names`."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by {ENV})", name=fullname)
        return None  # not ours: the next finder looks


def parse(value):
    """The package names of a DEFORMUX_HIDE_MODULES value ("torch, nibabel" -> ["torch", "nibabel"])."""
    return [n.strip() for n in (value or "").split(",") if n.strip()]


def hide(names):
    """Installs a finder hiding `names` and returns it. A package that is already imported cannot be
    hidden (its module objects are referenced elsewhere): that raises RuntimeError."""
    names = list(names)
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in names)
    if loaded:
        raise RuntimeError(f"{ENV}: cannot hide modules that are already imported: {', '.join(loaded)}")
    finder = HiddenModuleFinder(names)
    sys.meta_path.insert(0, finder)
    return finder


def unhide(finder):
    sys.meta_path.remove(finder)


def hidden():
    """The names hidden in this process (empty when no finder is installed)."""
    return sorted(set().union(*(f.names for f in sys.meta_path if isinstance(f, HiddenModuleFinder))))


def hide_from_environment():
    """Hides what DEFORMUX_HIDE_MODULES lists (nothing when it is unset or empty)."""
    names = parse(os.environ.get(ENV))
    return hide(names) if names else None
