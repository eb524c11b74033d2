"""Create leases: who may make a resource under the row's own id (`PUT <Type>/<uuid5(table, row)>`, unconditional),
one caller at a time, for a while. Pure rules and the in-process store; the ledger's store (Table Storage, across
instances) is `writeback.outcomes.OutcomeStore`.

A creator takes a resource's lease under a name of its own and with the row version it writes: no one else gets it
while it runs, and it gives back only a lease it still holds. A release of the row's resource of its old type that
finds no such resource (`BatchDelivery._write`) takes the lease under `RELEASE_HOLDER`, with the version of the
change that made the row another type, and keeps it until it expires: an older create of that resource, on another
instance, which read "absent" too, cannot make it any more. A newer one can (the type changed back): it takes the
lease over. A release is granted a lease a release holds (its own earlier try).
"""

from __future__ import annotations

import time

from writeback.marks import Version

RELEASE_HOLDER = "release"


def granted(held_by: str, held_version: str, holder: str, version: str) -> bool:
    """Whether a lease still running, held by `held_by` for row version `held_version`, goes to a caller asking as
    `holder` for `version` as well: the same holder name again, or a create newer than the release holding it."""
    if holder and held_by == holder:
        return True
    return held_by == RELEASE_HOLDER and holder != RELEASE_HOLDER \
        and Version.parse(version).compare(Version.parse(held_version)) == 1


def released_by(held_by: str, holder: str) -> bool:
    """Whether `holder` may give back a lease held by `held_by`: its own (no name: whoever holds it)."""
    return not holder or held_by == holder


class LocalLeases:
    """`Leases` within one process: what the CLI and the benchmark use when no Table Storage is configured (the
    function always has the ledger's, which holds across instances)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, str, str]] = {}

    async def acquire(self, key: str, seconds: float, holder: str = "", version: str = "") -> bool:
        now = time.monotonic()
        until, held_by, held_version = self._held.get(key, (0.0, "", ""))
        if until > now and not granted(held_by, held_version, holder, version):
            return False
        if until <= now or held_by != holder:
            self._held[key] = (now + seconds, holder, version)
        return True

    async def release(self, key: str, holder: str = "") -> None:
        if key in self._held and released_by(self._held[key][1], holder):
            del self._held[key]
