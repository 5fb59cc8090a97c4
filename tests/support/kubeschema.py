"""What kube-apiserver does with a custom resource's body: the CRD's structural schema (pruning,
defaults, validation as 422 field errors) and RFC 6902 JSON patch."""

from __future__ import annotations

import copy
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def crd_schema(path: Path) -> tuple[str, Obj]:
    """(kind, openAPIV3Schema of the storage version) of a CRD manifest."""
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def apply_schema(obj: Obj, schema: Obj) -> tuple[Obj, list[str]]:
    """The pruned and defaulted object, and the field errors a 422 would list."""
    out = copy.deepcopy(obj)
    errors: list[str] = []
    root = {k: v for k, v in out.items() if k not in ("apiVersion", "kind", "metadata")}
    props = {k: s for k, s in (schema.get("properties") or {}).items()
             if k not in ("apiVersion", "kind", "metadata")}
    pruned = _walk(root, dict(schema, properties=props), "", errors)
    kept = {k: out[k] for k in ("apiVersion", "kind", "metadata") if k in out}
    return {**kept, **pruned}, errors


def _walk(value: Any, schema: Obj, path: str, errors: list[str]) -> Any:
    typ = schema.get("type")
    if not _type_ok(value, typ):
        errors.append(f'{path or "<root>"}: Invalid value: "{_typename(value)}": '
                      f'{path or "body"} in body must be of type {typ}: "{_typename(value)}"')
        return value
    if typ == "object":
        return _walk_object(value, schema, path, errors)
    if typ == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: Invalid value: {len(value)}: {path} in body should have "
                          f"at least {schema['minItems']} items")
        items = schema.get("items") or {}
        return [_walk(v, items, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    _check_scalar(value, schema, path, errors)
    return value


def _walk_object(value: Obj, schema: Obj, path: str, errors: list[str]) -> Obj:
    props: Obj = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    out: Obj = {}
    for key, sub in props.items():  # defaults fill in absent fields of an existing object
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
    for key, v in value.items():
        sub_path = f"{path}.{key}" if path else key
        if key in props:
            out[key] = _walk(v, props[key], sub_path, errors)
        elif isinstance(extra, dict):
            out[key] = _walk(v, extra, sub_path, errors)
        elif preserve or extra is True:
            out[key] = v
        # anything else is pruned, silently, as kube-apiserver does
    for key in schema.get("required") or []:
        if key not in out:
            errors.append(f"{path + '.' if path else ''}{key}: Required value")
    return out


def _check_scalar(value: Any, schema: Obj, path: str, errors: list[str]) -> None:
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{e}"' for e in schema["enum"])
        errors.append(f'{path}: Unsupported value: "{value}": supported values: {allowed}')
    if "minimum" in schema and isinstance(value, int | float) and value < schema["minimum"]:
        errors.append(f"{path}: Invalid value: {value}: {path} in body should be greater than "
                      f"or equal to {schema['minimum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f'{path}: Invalid value: "{value}": {path} in body should match '
                          f"'{schema['pattern']}'")
        if schema.get("format") == "date-time" and not _is_datetime(value):
            errors.append(f'{path}: Invalid value: "{value}": {path} in body must be of type '
                          f'date-time: "{value}"')


def _type_ok(value: Any, typ: str | None) -> bool:
    if typ is None:
        return True
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[typ])


def _typename(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), "null")


def _is_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in text


# --- RFC 6902 JSON patch --------------------------------------------------------------------

class PatchError(ValueError):
    pass


def json_patch(doc: Any, ops: list[Obj]) -> Any:
    out = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            if _get(out, path) != op.get("value"):
                raise PatchError(f"testing value {path} failed")
        elif kind == "remove":
            _remove(out, path)
        elif kind in ("add", "replace"):
            if kind == "replace":
                _get(out, path)  # must exist
            out = _add(out, path, copy.deepcopy(op.get("value")), replace=kind == "replace")
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_get(out, op.get("from", "")))
            if kind == "move":
                _remove(out, op["from"])
            out = _add(out, path, value, replace=False)
        else:
            raise PatchError(f"unknown JSON patch operation {kind!r}")
    return out


def _tokens(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _parent(doc: Any, path: str) -> tuple[Any, str]:
    tokens = _tokens(path)
    if not tokens:
        raise PatchError("the root cannot be the target")
    cur = doc
    for t in tokens[:-1]:
        cur = _child(cur, t, path)
    return cur, tokens[-1]


def _child(cur: Any, token: str, path: str) -> Any:
    try:
        return cur[int(token)] if isinstance(cur, list) else cur[token]
    except (KeyError, IndexError, ValueError, TypeError):
        raise PatchError(f"path {path!r} does not exist") from None


def _get(doc: Any, path: str) -> Any:
    cur = doc
    for t in _tokens(path):
        cur = _child(cur, t, path)
    return cur


def _remove(doc: Any, path: str) -> None:
    parent, last = _parent(doc, path)
    _child(parent, last, path)
    if isinstance(parent, list):
        del parent[int(last)]
    else:
        del parent[last]


def _add(doc: Any, path: str, value: Any, *, replace: bool) -> Any:
    if not _tokens(path):
        return value
    parent, last = _parent(doc, path)
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if replace:
            parent[index] = value
        else:
            parent.insert(index, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise PatchError(f"path {path!r} does not exist")
    return doc
