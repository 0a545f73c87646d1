"""Check that every public name of eqx_gn has an API entry in docs/api/*.md.

A public name of a package is one in its ``__all__``, or any attribute whose name
does not start with ``_`` and that is not a module. It is documented when a
``::: <identifier>`` line in docs/api/*.md names it, either by its public path
(``::: eqx_gn.Blocks``) or by any path that resolves to the same object
(``::: eqx_gn._blocks.Blocks``). Entries that do not resolve are errors too.

Run from anywhere: ``python scripts/check_api_docs.py``. Exit status 1 lists what
is missing.
"""

import importlib
import re
import sys
import types
from pathlib import Path

PACKAGES = ("eqx_gn", "eqx_gn.baselines", "eqx_gn.lm")
API_DIR = Path(__file__).resolve().parent.parent / "docs" / "api"
ENTRY = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def public_names(module: types.ModuleType) -> list[str]:
    names = set(getattr(module, "__all__", ()))
    for name, value in vars(module).items():
        if not name.startswith("_") and not isinstance(value, types.ModuleType):
            names.add(name)
    return sorted(names)


def resolve(identifier: str):
    """The object ``identifier`` names (``pkg.mod.Name`` or ``pkg.mod.Cls.attr``)."""
    parts = identifier.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module in {identifier!r}")


def main() -> int:
    pages = sorted(API_DIR.glob("*.md"))
    if not pages:
        print(f"no API pages found in {API_DIR}", file=sys.stderr)
        return 1
    entries: dict[str, Path] = {}
    for page in pages:
        for identifier in ENTRY.findall(page.read_text(encoding="utf-8")):
            entries.setdefault(identifier, page)

    errors = []
    documented_ids = set()
    for identifier, page in entries.items():
        try:
            documented_ids.add(id(resolve(identifier)))
        except Exception as e:
            errors.append(f"{page.name}: '::: {identifier}' does not resolve ({e})")

    missing = []
    total = 0
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in public_names(module):
            total += 1
            path = f"{package}.{name}"
            if path in entries:
                continue
            if not hasattr(module, name):
                missing.append(f"{path} (in __all__ but not defined)")
            elif id(getattr(module, name)) not in documented_ids:
                missing.append(path)

    for error in errors:
        print(error, file=sys.stderr)
    if missing:
        print(
            f"{len(missing)} public name(s) without a '::: ' entry in docs/api/*.md:",
            file=sys.stderr,
        )
        for path in missing:
            print(f"  {path}", file=sys.stderr)
    if errors or missing:
        return 1
    print(
        f"All {total} public names of {', '.join(PACKAGES)} have an API entry "
        f"({len(entries)} entries in {len(pages)} pages)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
