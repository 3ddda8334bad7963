"""Where the Admin API's objects are kept: in memory, or in the ``admin_state`` file."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Dict

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from openaigw.config import ConfigError
from openaigw.interfaces import IObjectStore

KINDS = ("routes", "upstreams", "consumers")
Objects = Dict[str, Dict[str, Dict[str, Any]]]
_VERSION = 1


class StateError(ConfigError):
    """The kept objects cannot be read: start-up stops, and nothing overwrites them."""


class StoreError(Exception):
    """A change could not be kept (``status``: 503 unavailable, 409 changed meanwhile)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def empty() -> Objects:
    return {kind: {} for kind in KINDS}


@implementer(IObjectStore)
class MemoryStore:
    """Objects that live as long as the process (no ``admin_state``)."""

    def __init__(self, objects: Any = None) -> None:
        self._objects = copy.deepcopy(objects) if objects is not None else empty()

    def load(self) -> Objects:
        return copy.deepcopy(self._objects)

    def put(self, kind: str, id: str, value: Dict[str, Any]) -> "Deferred[None]":
        self._objects[kind][id] = copy.deepcopy(value)
        return succeed(None)

    def delete(self, kind: str, id: str) -> "Deferred[None]":
        self._objects[kind].pop(id, None)
        return succeed(None)

    def replace(self, objects: Objects) -> "Deferred[None]":
        self._objects = copy.deepcopy(objects)
        return succeed(None)


@implementer(IObjectStore)
class FileStore:
    """Objects in one JSON file, replaced atomically on every change.

    A change is written to a temporary file in the same directory, flushed to disk,
    renamed over the file and the directory flushed, before the Deferred fires: once
    the answer is sent, the change survives a crash or a power cut.  The file is
    small and written in the reactor thread (a few milliseconds, fsync included).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._objects = empty()

    def load(self) -> Objects:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return empty()  # first start: written with the first change
        except OSError as e:
            raise StateError(f"{self.path}: cannot read the Admin API state: {e.strerror}") from None
        self._objects = _decode(self.path, data)
        return copy.deepcopy(self._objects)

    def put(self, kind: str, id: str, value: Dict[str, Any]) -> "Deferred[None]":
        objects = copy.deepcopy(self._objects)
        objects[kind][id] = value
        return self._save(objects)

    def delete(self, kind: str, id: str) -> "Deferred[None]":
        objects = copy.deepcopy(self._objects)
        objects[kind].pop(id, None)
        return self._save(objects)

    def replace(self, objects: Objects) -> "Deferred[None]":
        return self._save(copy.deepcopy(objects))

    def _save(self, objects: Objects) -> "Deferred[None]":
        try:
            write_atomically(self.path, encode(objects))
        except OSError as e:
            return fail(StoreError(503, f"cannot write {self.path}: {e.strerror}"))
        self._objects = objects
        return succeed(None)


def encode(objects: Objects) -> bytes:
    return json.dumps({"version": _VERSION, **objects}, indent=1, sort_keys=True).encode("utf-8") + b"\n"


def _decode(path: str, data: bytes) -> Objects:
    def corrupt(why: str) -> StateError:
        return StateError(
            f"{path}: the Admin API state is corrupt ({why}); openaigw never overwrites it:"
            " repair it, or move it away to start without the Admin API's objects"
        )

    try:
        state = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise corrupt("not UTF-8") from None
    except ValueError as e:
        raise corrupt(f"not JSON: {e}") from None
    if not isinstance(state, dict) or state.get("version") != _VERSION:
        raise corrupt(f"expected an object with \"version\": {_VERSION}")
    objects = empty()
    for kind in KINDS:
        kept = state.get(kind, {})
        if not isinstance(kept, dict) or not all(isinstance(v, dict) for v in kept.values()):
            raise corrupt(f"{kind!r} is not an object of objects")
        objects[kind] = kept
    unknown = set(state) - set(KINDS) - {"version"}
    if unknown:
        raise corrupt(f"unknown keys {', '.join(sorted(unknown))}")
    return objects


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data``: temporary file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
