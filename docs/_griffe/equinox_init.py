"""Griffe extension: signatures and bases of Equinox Modules in the API pages.

An ``eqx.Module`` is a dataclass, but it is not decorated with ``@dataclass``, so
static analysis sees no ``__init__`` and the API pages would show ``CG()``. For every
Module of the package without an ``__init__`` of its own (or of an ancestor), this
builds one from the dataclass fields Python actually generates (taken from the
imported class, so the order, defaults and ``init=False`` fields are exactly right),
with the annotations and default expressions as written in the source.

It also hides private intermediate bases: a class listed as deriving from
``_AbstractInnerLoop`` is shown as deriving from that class's own (public) bases.
"""

import dataclasses
import importlib
from typing import Any

import griffe
from griffe import (
    Class,
    ExprCall,
    Function,
    Module,
    Parameter,
    ParameterKind,
    Parameters,
)


def _runtime_class(cls: Class) -> Any:
    try:
        module = importlib.import_module(cls.module.path)
    except Exception:  # pragma: no cover - the docs build imports the package
        return None
    obj = module
    for part in cls.path[len(cls.module.path) + 1 :].split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _is_equinox_module(obj: Any) -> bool:
    try:
        import equinox as eqx
    except ImportError:  # pragma: no cover
        return False
    return (
        isinstance(obj, type)
        and issubclass(obj, eqx.Module)
        and dataclasses.is_dataclass(obj)
    )


def _attribute(cls: Class, name: str):
    try:
        chain = [cls, *cls.mro()]
    except ValueError:
        chain = [cls]
    for c in chain:
        member = c.members.get(name)
        if member is not None and not member.is_alias and member.is_attribute:
            return member
    return None


def _field_call_arguments(value) -> dict[str, Any] | None:
    """The keyword arguments of ``eqx.field(...)`` / ``dataclasses.field(...)``."""
    if not isinstance(value, ExprCall):
        return None
    function = str(value.function)
    if not (function == "field" or function.endswith(".field")):
        return None
    arguments = {}
    for argument in value.arguments:
        name = getattr(argument, "name", None)
        if name is not None:
            arguments[name] = argument.value
    return arguments


def _default(field: dataclasses.Field, attribute) -> Any:
    has_default = field.default is not dataclasses.MISSING
    has_factory = field.default_factory is not dataclasses.MISSING
    if not (has_default or has_factory):
        return None
    value = None if attribute is None else attribute.value
    arguments = _field_call_arguments(value)
    if arguments is None and value is not None:
        return value
    if arguments is not None:
        if "default" in arguments:
            return arguments["default"]
        if "default_factory" in arguments:
            return ExprCall(function=arguments["default_factory"], arguments=[])
    if has_default:
        return repr(field.default)
    return f"{getattr(field.default_factory, '__name__', 'factory')}()"


def _has_explicit_init(cls: Class, explicit: set[str]) -> bool:
    try:
        chain = [cls, *cls.mro()]
    except ValueError:
        chain = [cls]
    return any(c.path in explicit for c in chain)


def _inherited_init(cls: Class, explicit: set[str], by_path: dict[str, Class]):
    """The ``__init__`` of the nearest private base, when ``cls`` has none itself."""
    if "__init__" in cls.members:
        return None
    for base in cls.bases:
        path = getattr(base, "canonical_path", str(base))
        parent = by_path.get(path)
        if parent is not None and parent.name.startswith("_") and path in explicit:
            return parent.members["__init__"]
    return None


def _classes(obj: Module | Class, seen: set[str]):
    if obj.path in seen:
        return
    seen.add(obj.path)
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_class:
            yield member
            yield from _classes(member, seen)
        elif member.is_module:
            yield from _classes(member, seen)


class EquinoxInit(griffe.Extension):
    """Give every Equinox Module its dataclass ``__init__`` signature."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        classes = list(_classes(pkg, set()))
        explicit = {c.path for c in classes if "__init__" in c.members}
        by_path = {c.path: c for c in classes}
        for cls in classes:
            if _has_explicit_init(cls, explicit):
                inherited = _inherited_init(cls, explicit, by_path)
                if inherited is not None:
                    # Show the __init__ a private base defines on its public subclass.
                    cls.set_member(
                        "__init__",
                        Function(
                            "__init__",
                            lineno=cls.lineno,
                            endlineno=cls.lineno,
                            parent=cls,
                            parameters=inherited.parameters,
                            returns=inherited.returns,
                        ),
                    )
                continue
            obj = _runtime_class(cls)
            if not _is_equinox_module(obj):
                continue
            parameters = [Parameter("self", kind=ParameterKind.positional_or_keyword)]
            for field in dataclasses.fields(obj):
                if not field.init:
                    continue
                attribute = _attribute(cls, field.name)
                kind = (
                    ParameterKind.keyword_only
                    if field.kw_only is True
                    else ParameterKind.positional_or_keyword
                )
                parameters.append(
                    Parameter(
                        field.name,
                        annotation=None if attribute is None else attribute.annotation,
                        kind=kind,
                        default=_default(field, attribute),
                    )
                )
            init = Function(
                "__init__",
                lineno=cls.lineno,
                endlineno=cls.lineno,
                parent=cls,
                parameters=Parameters(*parameters),
                returns="None",
            )
            cls.set_member("__init__", init)
        for cls in classes:
            cls.bases = _public_bases(cls.bases, by_path)


def _public_bases(bases, by_path: dict[str, Class]) -> list:
    public = []
    for base in bases:
        path = getattr(base, "canonical_path", str(base))
        private = by_path.get(path)
        if private is not None and private.name.startswith("_"):
            public.extend(_public_bases(private.bases, by_path))
        elif base not in public:
            public.append(base)
    return public


class RuntimeDocstrings(griffe.Extension):
    """Use the imported class's docstring where the package completes it at import
    time (``eqx_gn.lm.TrainConfig`` appends the description of every setting, the
    same text the ``eqx-gn`` command's help shows)."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        for cls in _classes(pkg, set()):
            obj = _runtime_class(cls)
            if not getattr(obj, "__doc_generated__", False):
                continue
            if cls.docstring is not None:
                cls.docstring.value = griffe.Docstring(obj.__doc__, parent=cls).value
            # Show each field's default, not the expression that declares it.
            for field in dataclasses.fields(obj):
                attribute = cls.members.get(field.name)
                if attribute is not None and not attribute.is_alias:
                    attribute.value = repr(field.default)
