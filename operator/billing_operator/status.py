"""Writing ``.status``: conditions, and what a failed reconciliation says on the object.

The reconcilers compute outcomes and raise :mod:`errors`; only this module turns those into
status fields and kopf's error types. So every resource reports failures the same way, and a
handler cannot forget to.

Conditions follow the Kubernetes API conventions (``metav1.Condition``): ``type``, ``status``
("True"/"False"), a CamelCase ``reason``, a human ``message``, ``lastTransitionTime`` (kept when
the status does not flip) and ``observedGeneration``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf

from billing_operator import errors

READY = "Ready"
SYNCED = "Synced"
MESSAGE_LENGTH_MAX = 1024


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def rfc3339(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def generation(body: Mapping[str, Any]) -> int | None:
    observed: int | None = body.get("metadata", {}).get("generation")
    return observed


def set_condition(
    patch: kopf.Patch, body: Mapping[str, Any], *, type: str, ok: bool, reason: str, message: str
) -> None:
    """Add or replace one condition, keeping the others.

    Written as a transformation of the object (kopf's ``patch.fns``), never as a merge patch of
    the ``conditions`` list. The handlers (Ready) and the status timers (Synced) write that one
    list concurrently, each from the body it saw, which may be a moment old; a merge patch
    replaces the whole list, so the later writer put the other's condition back as it had seen
    it. A timer that decided its write before a handler's retry succeeded set Ready back to
    False after the handler had set it True, and no one wrote it again: the object stayed not
    Ready for good. kopf applies a transformation to the freshest body it knows and sends the
    result as a JSON patch guarded by ``metadata.resourceVersion``; on a conflict (HTTP 422) it
    applies it again to the newer body, on the next handling cycle or the timer's next tick.
    """
    put = functools.partial(
        _put_condition,
        type=type,
        ok=ok,
        reason=reason,
        message=message[:MESSAGE_LENGTH_MAX],
        observed=generation(body),
    )
    # Nothing to send if the object, with what this patch already does, has it so.
    preview: kopf.RawBody = {"status": copy.deepcopy(dict(body.get("status") or {}))}
    for fn in patch.fns:
        fn(preview)
    before = copy.deepcopy(preview)
    put(preview)
    if preview != before:
        patch.fns.append(put)


def _put_condition(
    body: kopf.RawBody, /, *, type: str, ok: bool, reason: str, message: str, observed: int | None
) -> None:
    conditions = body.setdefault("status", {}).setdefault("conditions", [])
    index, before = next(((i, c) for i, c in enumerate(conditions) if c.get("type") == type), (None, None))
    status_text = "True" if ok else "False"
    condition = {
        "type": type,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": (
            before["lastTransitionTime"]
            if before is not None and before.get("status") == status_text and before.get("lastTransitionTime")
            else now_rfc3339()
        ),
    }
    if observed is not None:
        condition["observedGeneration"] = observed
    if before is not None and all(before.get(k) == v for k, v in condition.items()):
        return
    if index is None:
        conditions.append(condition)
    else:
        conditions[index] = condition


def condition(body: Mapping[str, Any], type: str) -> Mapping[str, Any] | None:
    return next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c.get("type") == type), None
    )


def to_kopf(error: errors.ReconcileError, retry_delay_s: float) -> kopf.PermanentError | kopf.TemporaryError:
    if error.permanent:
        return kopf.PermanentError(f"{error.reason}: {error.message}")
    delay = error.delay_s if error.delay_s is not None else retry_delay_s
    return kopf.TemporaryError(f"{error.reason}: {error.message}", delay=delay)


@contextlib.asynccontextmanager
async def reconciling(
    *,
    patch: kopf.Patch,
    body: Mapping[str, Any],
    retry_delay_s: float,
    logger: kopf.Logger,
) -> AsyncIterator[None]:
    """Around a handler's work: a failure becomes ``Ready=False`` with its reason, then kopf's error.

    kopf applies ``patch`` even when the handler raises, so the condition reaches the object on
    every attempt, while kopf keeps retrying (temporary) or stops until the spec changes
    (permanent).
    """
    try:
        yield
    except errors.ReconcileError as exc:
        set_condition(patch, body, type=READY, ok=False, reason=exc.reason, message=exc.message)
        raise to_kopf(exc, retry_delay_s) from None
    except (kopf.PermanentError, kopf.TemporaryError):
        raise
    except Exception as exc:
        set_condition(
            patch,
            body,
            type=READY,
            ok=False,
            reason="Error",
            message=f"unexpected {type(exc).__name__}; see the operator's log",
        )
        logger.error(f"unexpected error while reconciling: {type(exc).__name__}")
        raise
