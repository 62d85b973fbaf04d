"""kmock's Kubernetes emulator, completed where the operator relies on API behaviour it lacks.

kmock 0.8's ``KubernetesEmulator`` stores objects "as is" and says so ("If you need special field
treatment, inherit and implement for your cases"). This subclass is that extension point; every
addition names the real API behaviour it stands in for:

1. Object identity on create: ``metadata.uid``, ``creationTimestamp``, ``resourceVersion``,
   ``generation: 1``, the namespace from the URL, and ``generateName`` (kopf posts Events with
   ``generateName: kopf-event-``; without it every Event after the first would collide).
   The operator keys its idempotency on the UID, so this one is essential.
2. ``resourceVersion`` bumped on every write (also through ``/status``, and the DELETE that only
   marks an object with finalizers), ``generation`` bumped when ``spec`` changes and when the
   object is marked.
3. JSON patches applied here, with a failing ``test`` op answered 422 as the API server does
   (kopf guards finalizer removal and the operator's conditions with
   ``test /metadata/resourceVersion``); a write is checked and applied in one step.
4. The status subresource: a PATCH to ``…/status`` changes only ``status``; a PATCH to the object
   never changes ``status`` (for the resources declared with ``subresources={'status'}``).
5. Delete preconditions (``preconditions.uid``) answered 409 on mismatch.
6. Watches that miss nothing and repeat nothing. kmock lists the existing objects first and
   subscribes to the change feed afterwards, so a write landing in between is never streamed;
   and it ignores ``?resourceVersion=``, so a watch started after a list re-sends every listed
   object. Both confuse kopf (it waits for a version that never comes, or spends the next event
   on a stale patch and then idles). Here lists carry the current resourceVersion, a watch
   from a version starts with the objects changed since, and the subscription is taken under
   the same lock as the snapshot, as the API server's watch cache guarantees.
7. Fault injection for the tests: :meth:`fail` makes matching requests fail before any state
   changes, like an API server that is away (kmock's reactions cannot do this: the emulator
   applies writes even when a reaction intercepts them); :meth:`hold` keeps matching requests
   in flight until the test lets them through, like a slow API server, so a test can order
   two writers deterministically instead of hoping a race goes one way.

Not emulated (the operator does not rely on it): owner-reference garbage collection (the
operator deletes its Secrets itself), CRD defaulting and validation (the operator applies the
same defaults; schemas are checked by tests/operator/test_crds.py), label/field selectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import random
import string
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import jsonpatch
import kmock

Predicate = Callable[[kmock.Request], bool]


def merge_patch(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    result = dict(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge_patch(result[key], value)
        elif isinstance(value, Mapping):
            result[key] = merge_patch({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns ``old`` into ``new`` (what kmock then applies)."""
    diff: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(old.get(key), Mapping):
            nested = merge_diff(old[key], value)
            if nested:
                diff[key] = nested
        elif key not in old or old[key] != value:
            diff[key] = value
    return diff


@attrs.define
class Hold:
    """Requests matching ``predicate`` wait, before anything is served, until :meth:`release`."""

    predicate: Predicate
    caught: list[kmock.Request] = attrs.field(factory=list)
    _answered: int = 0
    _arrived: asyncio.Event = attrs.field(factory=asyncio.Event)
    _released: asyncio.Event = attrs.field(factory=asyncio.Event)
    _served: asyncio.Event = attrs.field(factory=asyncio.Event)

    def release(self) -> None:
        self._released.set()

    async def arrived(self) -> kmock.Request:
        """Wait until a matching request is held; returns the first one."""
        await self._arrived.wait()
        return self.caught[0]

    async def served(self) -> None:
        """Wait until every held request has been answered (after :meth:`release`)."""
        await self._served.wait()

    async def _admit(self, request: kmock.Request) -> bool:
        """Called with every request: hold it if it matches (True), else let it pass (False)."""
        if self._released.is_set() or not self.predicate(request):
            return False
        self.caught.append(request)
        self._arrived.set()
        await self._released.wait()
        return True

    def _answer(self) -> None:
        self._answered += 1
        if self._answered == len(self.caught):
            self._served.set()


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _version: int = attrs.field(default=1000, init=False)
    _faults: list[tuple[Predicate, int]] = attrs.field(factory=list, init=False)
    _observers: list[Callable[[kmock.Request], None]] = attrs.field(factory=list, init=False)
    _holds: list[Hold] = attrs.field(factory=list, init=False)
    # Writes are checked (preconditions, a JSON patch's ``test``), computed against the stored
    # object and applied by kmock as one step, as the API server does (compare-and-swap in etcd).
    # kmock applies under its own lock, which it also holds while it publishes to watchers; a
    # write computed before taking it could be checked against a state that another write,
    # queued on the same lock, was about to replace: both passed ``test``, and the later one put
    # back what the earlier one had changed. Not kmock's lock: kmock takes that one itself.
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    def observe(self, callback: Callable[[kmock.Request], None]) -> None:
        """Call ``callback`` with every request before it is served (to act at a precise moment)."""
        self._observers.append(callback)

    def fail(self, predicate: Predicate, status: int = 503) -> Callable[[], None]:
        """Fail matching requests with ``status`` until the returned function is called."""
        fault = (predicate, status)
        self._faults.append(fault)
        return lambda: self._faults.remove(fault)

    @contextlib.asynccontextmanager
    async def hold(self, predicate: Predicate) -> AsyncIterator[Hold]:
        """Hold matching requests in flight (see :class:`Hold`); all are let through on exit."""
        hold = Hold(predicate)
        self._holds.append(hold)
        try:
            yield hold
        finally:
            hold.release()
            self._holds.remove(hold)

    async def _held(self, request: kmock.Request) -> Hold | None:
        for hold in list(self._holds):
            if await hold._admit(request):
                return hold
        return None

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        for known in self.resources:
            if known == resource:
                return "status" in self.resources[known].subresources
        return False

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    async def _handle(self, request: kmock.Request):
        for observer in list(self._observers):
            observer(request)
        hold = await self._held(request)
        try:
            return await self._serve(request)
        finally:
            if hold is not None:
                hold._answer()

    async def _serve(self, request: kmock.Request):
        for predicate, status in list(self._faults):
            if predicate(request):
                raise kmock.KubernetesError(status=status, reason="Injected", message="injected by the test")
        if request.resource is None or request.action not in (
            kmock.action.CREATE,
            kmock.action.UPDATE,
            kmock.action.DELETE,
        ):
            return await super()._handle(request)  # reads, and watches (which last): no lock
        async with self._write_lock:
            if request.action == kmock.action.CREATE and isinstance(request.data, Mapping):
                self._rewrite(request, self._created(request))
            elif request.action == kmock.action.UPDATE and request.name is not None:
                self._rewrite(request, self._updated(request))
            elif request.action == kmock.action.DELETE and request.name is not None:
                self._check_preconditions(request)
                await self._mark_deleting(request)
            return await super()._handle(request)

    @staticmethod
    def _rewrite(request: kmock.Request, data: Any) -> None:
        # kmock matches its reactions to requests by identity (the request it recorded), so the
        # request is changed in place rather than replaced; Request is a frozen attrs class.
        object.__setattr__(request, "data", data)

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now: the stream has started even if nothing happens
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else 0
        async with self._lock:  # writers publish under this lock: nothing falls in between
            marker = await bus.mark()
            existing = [
                obj.raw
                for (resource, namespace, name), obj in self.objects.items()
                if not obj.deleted
                and self._watched(request, resource, namespace, name)
                and int(obj.raw.get("metadata", {}).get("resourceVersion") or 0) > since_version
            ]
        try:
            for raw in existing:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._watched(request, request.resource, meta.get("namespace"), meta.get("name")):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _serve_list(self, request: kmock.Request) -> Any:
        # The version before the snapshot: a watch from it may repeat a change, never miss one.
        version = str(self._version)
        payload = await super()._serve_list(request)
        payload["metadata"]["resourceVersion"] = version
        return payload

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    @staticmethod
    def _watched(request: kmock.Request, resource: Any, namespace: str | None, name: str | None) -> bool:
        return (
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    def _created(self, request: kmock.Request) -> dict[str, Any]:
        obj = copy.deepcopy(dict(request.data))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        if request.namespace is not None:
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = self._next_version()
        if self._has_status_subresource(request.resource):
            meta["generation"] = 1
        return obj

    def _updated(self, request: kmock.Request) -> Any:
        old = self._stored(request)
        if old is None:
            return request.data  # kmock answers 404
        if isinstance(request.data, list):
            try:
                new = jsonpatch.apply_patch(old, request.data, in_place=False)
            except (jsonpatch.JsonPatchConflict, jsonpatch.JsonPatchTestFailed) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from None
        else:
            new = merge_patch(old, request.data or {})
        if self._has_status_subresource(request.resource):
            # Through /status only the status changes; through the object never the status.
            source, kept = (new, old) if request.subresource == "status" else (old, new)
            new = {k: v for k, v in kept.items() if k != "status"}
            if "status" in source:
                new["status"] = source["status"]
        # Nothing shared with ``old``: the two are compared below, and the new resourceVersion
        # goes into ``new`` only. (Built from ``old``'s metadata, a write through /status once
        # set the new version in both, so it never changed, and every ``test`` of it passed.)
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if immutable in old.get("metadata", {}):
                meta[immutable] = old["metadata"][immutable]
        if new.get("spec") != old.get("spec") and "generation" in old.get("metadata", {}):
            meta["generation"] = int(old.get("metadata", {}).get("generation", 1)) + 1
        if new != old:
            meta["resourceVersion"] = self._next_version()
        return merge_diff(old, new)

    async def _mark_deleting(self, request: kmock.Request) -> None:
        """A DELETE of an object with finalizers only marks it: ``deletionTimestamp``, and, as the
        API server's registry does it (``markAsDeleting``), a new ``resourceVersion`` and
        ``generation``. kmock sets the timestamp but keeps the version, so a watch started from a
        list taken before the DELETE never streamed the deletion (its version was not newer).
        Done here, under kmock's lock; kmock then finds the object marked and leaves it so."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return  # kmock answers 404
            obj = self.objects[key]
            meta = obj.raw.get("metadata", {})
            if meta.get("deletionTimestamp") or not meta.get("finalizers"):
                return  # already marked, or deleted at once by kmock
            marked: dict[str, Any] = {
                "deletionTimestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "resourceVersion": self._next_version(),
            }
            if "generation" in meta:
                marked["generation"] = int(meta["generation"]) + 1
            obj.patch({"metadata": marked})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})

    def _check_preconditions(self, request: kmock.Request) -> None:
        wanted = (
            ((request.data or {}).get("preconditions") or {}).get("uid")
            if isinstance(request.data, Mapping)
            else None
        )
        stored = self._stored(request)
        if wanted and stored is not None and stored.get("metadata", {}).get("uid") != wanted:
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="precondition failed: UID mismatch"
            )


def declare(emulator: Emulator) -> None:
    """The resources the operator (and kopf) discover and use."""
    info = kmock.ResourceInfo
    crud = {"get", "list", "watch", "create", "update", "patch", "delete"}
    emulator.resources["billingproxy.io/v1alpha1/wallets"] = info(
        kind="Wallet",
        singular="wallet",
        namespaced=True,
        verbs=crud,
        subresources={"status"},
        shortnames={"wal"},
        categories={"billingproxy"},
    )
    emulator.resources["billingproxy.io/v1alpha1/apikeys"] = info(
        kind="ApiKey",
        singular="apikey",
        namespaced=True,
        verbs=crud,
        subresources={"status"},
        shortnames={"ak"},
        categories={"billingproxy"},
    )
    emulator.resources["v1/secrets"] = info(kind="Secret", singular="secret", namespaced=True, verbs=crud)
    emulator.resources["v1/events"] = info(kind="Event", singular="event", namespaced=True, verbs=crud)
    emulator.resources["v1/namespaces"] = info(
        kind="Namespace", singular="namespace", namespaced=False, verbs=crud
    )
    emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False, verbs=crud
    )
