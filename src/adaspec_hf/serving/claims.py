"""One policy object serves one engine at a time: its per-step state (and per-row state keyed by
request ids, which restart at 1 in every engine) would be mixed up by two step loops. The claims
are kept here, on the serving side, so a policy needs no attribute for them."""
from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from adaspec_hf.policies import DraftPolicy

if TYPE_CHECKING:  # pragma: no cover
    from adaspec_hf.serving.engine import Engine

# id(policy) -> (the policy, the engine using it), both weak: a claim never keeps either alive,
# and keying by id also serves policies that define __eq__ without __hash__
_claims: dict[int, tuple["weakref.ref[DraftPolicy]", "weakref.ref[Engine]"]] = {}
_lock = threading.Lock()


def claim_policy(policy: DraftPolicy, engine: "Engine") -> None:
    """Record that ``engine`` uses ``policy``; ValueError while another engine still runs with it."""
    with _lock:
        for key in [k for k, (p, e) in _claims.items() if p() is None or e() is None]:
            del _claims[key]  # the policy or its engine is gone
        held = _claims.get(id(policy))
        if held is not None and held[0]() is policy:
            other = held[1]()
            if other is not None and other is not engine and not other.released:
                raise ValueError(
                    f"this {type(policy).__name__} policy object is already used by another running Engine; give "
                    "each engine its own policy (a new one, or copy.deepcopy(policy)), or close the other engine "
                    "first")
        _claims[id(policy)] = (weakref.ref(policy), weakref.ref(engine))
