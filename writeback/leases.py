"""Create leases: who may make a resource under the row's own id (`PUT <Type>/<uuid5(table, row)>`, unconditional),
one caller at a time, for a while. Pure rules and the in-process store; the ledger's store (Table Storage, across
instances) is `writeback.outcomes.OutcomeStore`.

A creator takes a resource's lease under a name of its own and with the row version it writes: no one else gets it
while it runs, and it gives back only a lease it still holds. A release of the row's resource of its old type that
finds no such resource (`BatchDelivery._write`) takes the lease under `RELEASE_HOLDER`, with the version of the
change that made the row another type, and keeps it until it expires: an older create of that resource, on another
instance, which read "absent" too, cannot make it any more. A newer one can (the type changed back): it takes the
lease over, and if its write is refused (nothing made) the release's lease is back in force. A release is granted a
lease a release holds (its own earlier try, or a release of a newer change, which raises its version). `take` and
`give_back` are these rules; each store keeps their result (Table Storage with the ETag it read).
"""

from __future__ import annotations

import time

from writeback.immutable import evolve, immutable
from writeback.marks import Version

RELEASE_HOLDER = "release"


@immutable
class Lease:
    """A create lease as a store keeps it: until when (seconds, on the store's clock), who holds it, for which row
    version; `under`, the release's lease a newer create took over, in force again when that create gives its
    lease back (its write refused: nothing made) while it still runs."""

    until: float
    holder: str
    version: str
    under: Lease | None = None


def _newer(version: str, than: str) -> bool:
    return Version.parse(version).compare(Version.parse(than)) == 1


def take(held: Lease | None, now: float, seconds: float, holder: str, version: str) -> Lease | None:
    """The lease once `holder` asks for it for `version` (None: refused; `held` itself: granted as it is). Free or
    expired: the caller's. Held under the caller's own name: granted again, not extended (a release of a newer
    change raises its version). Held by a release: a create of a newer version takes it over."""
    if held is None or held.until <= now:
        return Lease(now + seconds, holder, version)
    if holder and held.holder == holder:
        return evolve(held, version=version) if _newer(version, held.version) else held
    if held.holder == RELEASE_HOLDER and holder != RELEASE_HOLDER and _newer(version, held.version):
        return Lease(now + seconds, holder, version, under=held)
    return None


def give_back(held: Lease, now: float, holder: str) -> Lease | None:
    """The lease once `holder` gives it back (None: gone; `held` itself: not the caller's to give, kept). No name:
    whoever holds it."""
    if holder and held.holder != holder:
        return held
    return held.under if held.under is not None and held.under.until > now else None


class LocalLeases:
    """`Leases` within one process: what the CLI and the benchmark use when no Table Storage is configured (the
    function always has the ledger's, which holds across instances)."""

    def __init__(self) -> None:
        self._held: dict[str, Lease] = {}

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        lease = take(self._held.get(key), time.monotonic(), seconds, holder, version)
        if lease is None:
            return False
        self._held[key] = lease
        return True

    async def release(self, key: str, holder: str = "") -> None:
        if key not in self._held:
            return
        lease = give_back(self._held[key], time.monotonic(), holder)
        if lease is None:
            del self._held[key]
        else:
            self._held[key] = lease
