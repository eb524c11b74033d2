"""What is known about a Dataverse row that other rows' writes depend on, and filling it into a plan. Pure.

A medical identifier goes into its contact's Patient only while that patient consents; an Encounter refers to
its patient as `Patient/<id>`. Neither message carries the contact's consent or FHIR id, so every contact's
message (written, skipped, even an `echo` of a record the FHIR→Dataverse sync ingested) leaves its `RowFacts`
behind: the row's type, consent and FHIR id (its `msemr_azurefhirid`, or the id this product wrote it under),
stamped with the row version they come from, so an older message never overwrites newer facts. The pipeline
keeps them in the row state (Table Storage) and in what the current batch says; `resolve` applies them to a
plan: the consent gates, the parents' FHIR ids, the lookups' references.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import field
from datetime import timedelta
from typing import TypeVar

from writeback.converge import ItemEdit, Release, RemoveItem, RowEdit
from writeback.decide import (
    PARENT_FROM_FACTS,
    Decision,
    RowKey,
    Write,
    WritePlan,
    consented,
    fhir_id_of,
    fhir_id_type,
    gate_table,
    gates_of,
    is_echo,
    resource_id,
    resource_type_of,
    row_state,
    version_of,
    whole_image,
)
from writeback.immutable import evolve, immutable
from writeback.mapping import RowRef
from writeback.maps import MapSet
from writeback.marks import Version
from writeback.messages import EntityRef, Message
from writeback.paths import KEEP
from writeback.reasons import Reason
from writeback.retry import GATE_WAIT
from writeback.settings import Settings

_V = TypeVar("_V", str, bool)

NOT_WRITABLE = ""  # resource_type of a row whose type no map writes (e.g. a contact that is a Related Person)
NO_PARENT = ""  # parent of a child row known to be linked to none (None: not known)
NO_FHIR_ID = ""  # fhir_id of a row whose FHIR id column a save cleared (None: not known)
SEEN_KEPT = 16  # the newest `versionnumber`s of a row's messages kept in its row state (`RowFacts.seen`)


@immutable
class RowFacts:
    table: str
    row_id: str
    version: Version = field(default_factory=Version)
    resource_type: str | None = None  # None: not known; NOT_WRITABLE: known, and no map writes it
    consent: bool | None = None
    # The row's msemr_azurefhirid: the record came from (or was synced to) FHIR. NO_FHIR_ID: a save cleared it (an
    # administrator's remedy for `target-missing`), so the resource is found or made by the row identifier again.
    fhir_id: str | None = None
    written: str | None = None  # `Type/<id>` of the resource this product found or wrote for the row
    # A child row's parent row (the medical identifier's contact), or the patient a clinical row belongs to (its
    # subject): what a later message without that lookup (a step without images) still needs the consent of.
    parent: str | None = None
    # The type of the resource `fhir_id` names (`decide.fhir_id_type`): the type the row had when it got the id.
    fhir_type: str | None = None
    # The version of the message each of type, consent and parent comes from (unknown: `version`'s). A message that
    # does not hold a column (a step without images) moves `version` but says nothing of that column's value: a
    # change that did (a move, a type change) is compared with the message that told the value, not with it.
    type_version: Version = field(default_factory=Version)
    consent_version: Version = field(default_factory=Version)
    parent_version: Version = field(default_factory=Version)
    # The mapped columns the FHIR→Dataverse sync set (an `echo`, written nowhere), each with the newest version that
    # set it, by column name: FHIR held those values first, so an older save of the row received later must leave
    # them as they are (`resolve`), not put its own older values back over another system's newer ones.
    echoed: tuple[tuple[str, Version], ...] = ()
    # The `versionnumber`s of the row's messages seen (the newest SEEN_KEPT, ascending): a pre image naming a version
    # between them that none of them has is a save not seen yet (`follows_seen`).
    seen: tuple[int, ...] = ()
    # The type the row had before its last type change, and the version that change is first known at (a contact
    # made a Practitioner: Patient): its child rows wait for it to be one again (`resolve`), where a contact that
    # never was one skips them at once. `type_version` moves with every message that holds the type: not this.
    type_before: str | None = None
    retyped: Version = field(default_factory=Version)
    # `Type/<id>` the row's FHIR id (or what was written for it) names, which a write of this product then found
    # missing on the server (`target-missing`: deleted there, an erasure or a merge's loser): no lookup names it any
    # more, until this product finds or writes the row there again.
    gone: str | None = None
    # `Type/<id>` a write of this call found or made the row's resource under: the event (learned, never kept in the
    # row state itself) that clears `gone` of that id, however the facts it is merged into are versioned.
    found: str | None = None

    @property
    def type_at(self) -> Version:
        return self.type_version if self.type_version.known else self.version

    @property
    def consent_at(self) -> Version:
        return self.consent_version if self.consent_version.known else self.version

    @property
    def parent_at(self) -> Version:
        return self.parent_version if self.parent_version.known else self.version

    @property
    def key(self) -> RowKey:
        return self.table, self.row_id

    def fhir_id_for(self, resource_type: str) -> str | None:
        """The row's FHIR id (msemr_azurefhirid) when it names a resource of that type, or may (type unknown)."""
        return self.fhir_id if self.fhir_id and self.fhir_type in (None, resource_type) else None

    def id_for(self, resource_type: str) -> str | None:
        """The FHIR id of the row's resource of that type (a contact that became a Practitioner was a Patient
        before: neither the id it was ingested under nor the one written then is the Practitioner's); not one
        found missing on the server since (`gone`)."""
        known = self._id_for(resource_type)
        return None if known is not None and self.gone == f"{resource_type}/{known}" else known

    def _id_for(self, resource_type: str) -> str | None:
        if self.fhir_id and self.fhir_type == resource_type:
            return self.fhir_id
        if self.fhir_id == NO_FHIR_ID:
            return None  # cleared (the resource it named is gone): what was written under it may be that one
        # An id whose type is not known may name another record of this type (a source that numbers each type on
        # its own): the resource this product found carrying the row, or made for it, is surely the row's (found by
        # review: a visit of a contact made a Patient named the unrelated Patient sharing its id).
        return self.written_id(resource_type) or self.fhir_id_for(resource_type)

    def written_id(self, resource_type: str) -> str | None:
        """The id of the resource of that type this product found carrying the row, or made for it."""
        if self.written and self.written.startswith(f"{resource_type}/"):
            return self.written.split("/", 1)[1]
        return None

    def merge(self, other: RowFacts) -> RowFacts:
        """These facts and `other` (of the same row): the newer version's values where it has them."""
        order = self.version.compare(other.version)
        newer, older = (other, self) if order is None or order <= 0 else (self, other)
        # One FHIR id keeps the type it was given under (the older message saw it first); a new id its own.
        fhir_id = newer.fhir_id if newer.fhir_id is not None else older.fhir_id
        fhir_type = (older.fhir_type or newer.fhir_type if newer.fhir_id == older.fhir_id
                     else newer.fhir_type if newer.fhir_id is not None else older.fhir_type)
        kind, kind_at = _newest(self.resource_type, self.type_at, other.resource_type, other.type_at)
        consent, consent_at = _newest(self.consent, self.consent_at, other.consent, other.consent_at)
        parent, parent_at = _newest(self.parent, self.parent_at, other.parent, other.parent_at)
        version = newer.version if newer.version.known else older.version
        type_before, retyped = _last_change(self, other)
        # Found missing stays until a write learns that the resource is found or made under that id again (`found`,
        # merged in). A message's facts carry the row's older `written` forward, which says nothing of it (found by
        # review: a newer save's facts, kept first, cleared a `gone` learned after them), and a learned write is
        # merged into the message's facts before they are kept, so it is told apart (found by review).
        gone = newer.gone or older.gone
        if gone is not None and other.found == gone and other.gone is None:
            gone = None
        return RowFacts(self.table, self.row_id, version, kind, consent, fhir_id,
                        newer.written or older.written, parent, fhir_type,
                        # (kept only where it is not `version`'s: facts compare equal however they were merged)
                        type_version=kind_at if kind_at != version else Version(),
                        consent_version=consent_at if consent_at != version else Version(),
                        parent_version=parent_at if parent_at != version else Version(),
                        echoed=_echoed(self.echoed, other.echoed),
                        seen=self.seen if self.seen == other.seen else
                        tuple(sorted(set(self.seen) | set(other.seen))[-SEEN_KEPT:]),
                        type_before=type_before, retyped=retyped, gone=gone, found=other.found or self.found)

    def follows_seen(self, before: Version) -> bool:
        """Whether the save that left the row at `before` (a message's pre image) may be one already seen: not when
        `before` is newer than every version these facts know, nor when it lies between two versions seen and is
        not one of them (a gap). Below the oldest version kept, or without a `versionnumber`, nothing tells: yes."""
        if before.compare(self.version) == 1:
            return False
        seen = set(self.seen)
        if self.version.number is not None:
            seen.add(self.version.number)  # (a row state kept before `seen` was)
        return before.number is None or not seen or before.number in seen or before.number < min(seen)

    def echoed_after(self, version: Version) -> frozenset[str]:
        """The columns the sync set in a version newer than `version`."""
        return frozenset(column for column, at in self.echoed if at.compare(version) == 1)


def _echoed(mine: tuple[tuple[str, Version], ...],
            theirs: tuple[tuple[str, Version], ...]) -> tuple[tuple[str, Version], ...]:
    """Per column, the newer version (the one merged in when their order is not known, as `_newest`)."""
    if not theirs or mine == theirs:
        return mine
    out = dict(mine)
    for column, at in theirs:
        known = out.get(column)
        if known is None or known.compare(at) != 1:
            out[column] = at
    return tuple(sorted(out.items()))


def _last_change(one: RowFacts, other: RowFacts) -> tuple[str | None, Version]:
    """The newest type change two facts of a row know: each one's own, and the one between them when they say
    different types (told by messages of each type, received in any order)."""
    changes: list[tuple[str | None, Version]] = [(f.type_before, f.retyped) for f in (one, other)
                                                 if f.type_before is not None]
    if one.resource_type is not None and other.resource_type is not None and \
            one.resource_type != other.resource_type and (order := one.type_at.compare(other.type_at)) is not None:
        older, newer = (other, one) if order > 0 else (one, other)
        changes.append((older.resource_type, newer.type_at))
    best: tuple[str | None, Version] = (None, Version())
    for before, at in changes:
        if best[0] is None or at.compare(best[1]) == 1:
            best = (before, at)
    return best


def _newest(mine: _V | None, mine_at: Version, theirs: _V | None, theirs_at: Version) -> tuple[_V | None, Version]:
    """Of two messages' values of one column, the newer message's (the other's when one does not hold it, or
    their order is not known: the one merged in is taken as the newer, as `RowFacts.merge` does)."""
    if theirs is None:
        return mine, mine_at if mine is not None else Version()
    if mine is None:
        return theirs, theirs_at
    order = mine_at.compare(theirs_at)
    return (mine, mine_at) if order is not None and order > 0 else (theirs, theirs_at)


def facts_of(message: Message, maps: MapSet, settings: Settings) -> RowFacts | None:
    """What a message says about its own row, whatever is decided about writing it."""
    entity_map = maps.get(message.table)
    if entity_map is None or message.payload_dropped:
        return None
    old, row, _ = row_state(message)
    resource_type: str | None = None
    if entity_map.resource_type is not None or (entity_map.choice_column or "") in row:
        resource_type = resource_type_of(entity_map, row) or NOT_WRITABLE
    consent = None
    column = entity_map.consent_column or settings.consent_column
    if entity_map.consent_types and column in row:
        consent = consented(row.get(column))
    parent: str | None = None
    if entity_map.expansion is not None:
        column = entity_map.expansion.parent_link
        link = row.get(column)
        # Known to be linked to no parent (the column cleared, or absent from a whole image): NO_PARENT, which a
        # newer message's facts keep over an older parent, so the older message that linked it is `stale`.
        parent = link.id if isinstance(link, EntityRef) else (
            NO_PARENT if column in row or whole_image(message) else None)
    elif resource_type:
        gates = gates_of(entity_map, maps, resource_type, row)
        parent = gates[0][1] if gates else None
    fhir_id = fhir_id_of(entity_map, row)
    if fhir_id is None and message.target is not None and \
            message.target.attributes.get(entity_map.fhir_id_column, "") is None:
        # Cleared in this save (its Target holds the column, empty). Only then: an image without the column (a step
        # registered narrower) must not make the product forget the resource it writes to and make another.
        fhir_id = NO_FHIR_ID
    version = version_of(message, row)
    echoed: tuple[tuple[str, Version], ...] = ()
    if message.message_name == "Update" and message.target is not None and version.known \
            and is_echo(message, settings):
        # What its Target holds is what FHIR held (the sync copied it from there); a Create has no older save.
        mapped = {a.column for a in entity_map.attributes if a.column}
        echoed = tuple(sorted((column, version) for column in mapped & set(message.target.attributes)))
    before = resource_type_of(entity_map, old) if old and entity_map.choice_column else None
    retyped = resource_type is not None and before is not None and before != resource_type
    return RowFacts(message.table, message.record_id, version, resource_type,
                    consent, fhir_id, parent=parent,
                    fhir_type=fhir_id_type(entity_map, old, row) if fhir_id else None, echoed=echoed,
                    seen=() if version.number is None else (version.number,),
                    type_before=before if retyped else None, retyped=version if retyped else Version())


def merged(facts: Iterable[RowFacts], into: dict[RowKey, RowFacts] | None = None) -> dict[RowKey, RowFacts]:
    out = {} if into is None else into
    for fact in facts:
        known = out.get(fact.key)
        out[fact.key] = fact if known is None else known.merge(fact)
    return out


def _as_known(decision: Decision, facts: Mapping[RowKey, RowFacts], maps: MapSet, settings: Settings) -> Decision:
    """A Target-only change without the row's type or consent (`decide._deferred`): its decision as the type the
    row's facts know, gated by the consent they know."""
    message = decision.message
    assert message is not None
    own = facts.get((message.table, message.record_id))
    entity_map = maps.get(message.table)
    chosen = decision
    if decision.alternatives:
        known = own.resource_type if own is not None else None
        if known is None or known not in decision.alternatives:
            column = entity_map.choice_column if entity_map is not None else None
            if known is None:  # its Create (or any message with the type) may still be on its way
                return evolve(decision, decision="reject", reason=Reason.TARGET_PENDING, plan=None,
                               alternatives={}, detail=f"Column {column} is not in the message (a step without "
                               "images), and no earlier message of the row has told its type yet.")
            return evolve(decision, decision="skip", reason=Reason.NO_ENTITY_MAP, plan=None,
                           alternatives={}, detail=f"Column {column} is not in the message (a step without images), "
                           f"and the row's type, from its earlier messages, is not one this map writes.")
        chosen = decision.alternatives[known]
    if decision.consent_from_facts and chosen.resource_type is not None and entity_map is not None \
            and chosen.resource_type in entity_map.consent_types and chosen.decision == "write":
        column = entity_map.consent_column or settings.consent_column
        consent = own.consent if own is not None else None
        if consent is None:  # as for a row of a patient whose consent is not known (WRITEBACK_CONSENT_UNKNOWN)
            return evolve(chosen, decision="skip" if settings.consent_unknown == "skip" else "reject",
                           reason=Reason.CONSENT_UNKNOWN, plan=None,
                           detail=f"Column {column} is not in the message (a step without images), and no earlier "
                           "message of the row has told its consent yet.")
        if not consent:
            return evolve(chosen, decision="skip", reason=Reason.CONSENT_WITHHELD, plan=None,
                           detail=f"Consent column {column} was not Yes in the row's last message that held it.")
    return evolve(chosen, alternatives={}, consent_from_facts=False)


# A whole state of a record that came from FHIR, received before an earlier save of its row that no message has told
# yet, waits this many retries for it (`RowEdit.awaits_earlier`): that save's pre image is what the ingest copied,
# which tells the record's items (a name, a phone, an identifier without `use`) that are the row's from other
# systems' (`paths.adopt`). One: Service Bus delivers a row's saves moments apart, well inside the first retry delay,
# and the save that never comes (a step with filtering attributes sends no message for other columns) must not hold
# the row's later saves back for long.
EARLIER_SAVE_GRACE_RETRIES = 1


def _sync_kept(plan: WritePlan, synced: frozenset[str]) -> WritePlan | None:
    """`plan` leaving the columns the sync set later as FHIR holds them: a whole state keeps them (`KEEP`), a
    change without images drops them (None: nothing of its own is left)."""
    edit = plan.writes[0].edit
    assert isinstance(edit, RowEdit | ItemEdit)
    if plan.full:
        owned = tuple(evolve(a, value=KEEP) if a.column in synced else a for a in edit.owned)
    else:
        owned = tuple(a for a in edit.owned if a.column not in synced)
        if not any(a.column is not None for a in owned):
            return None
    return plan.with_edit(evolve(edit, owned=owned, rendered=None) if isinstance(edit, RowEdit)
                          else evolve(edit, owned=owned))


def _left_behind(decision: Decision, maps: MapSet, gate: RowKey) -> str:
    """For a row moved to a patient who has not consented (its lookup changed in this save): FHIR still holds it
    under the patient it had, which nothing of the new patient may change. Said, by ids only, so an administrator
    can review it there."""
    message, plan = decision.message, decision.plan
    entity_map = maps.get(message.table) if message is not None else None
    if message is None or message.pre_image is None or plan is None or entity_map is None:
        return ""
    before = gates_of(entity_map, maps, plan.resource_type, dict(message.pre_image.attributes))
    moved = [old for old in before if old[0] == gate[0] and old != gate]
    if not moved:
        return ""
    return (f" It was moved from {moved[0][0]} {moved[0][1]}: FHIR still holds it under that patient; review it "
            "there.")


def _parent_from_facts(plan: WritePlan) -> bool:
    return isinstance(plan.writes[0].edit, ItemEdit) and plan.target.identifier_value == PARENT_FROM_FACTS


def inherited_gate_table(plan: WritePlan, maps: MapSet) -> str | None:
    """For a child row of a clinical row (an encounter's participant): the table of the patient its parent obeys the
    consent of (`gate_table` of the parent's map), which the parent's facts name; else None. Not for a row that only
    leaves its visit (unlinked): a removal goes whatever that patient's consent (found by review)."""
    if plan.gates or not isinstance(plan.writes[0].edit, ItemEdit):
        return None
    parent_map = maps.get(plan.writes[0].target.table)
    if parent_map is None or parent_map.consent_types:
        return None
    return next((t for t in (gate_table(a, maps) for a in parent_map.attributes) if t is not None), None)


def inherited_gates(plan: WritePlan, parent: RowKey, facts: Mapping[RowKey, RowFacts],
                    maps: MapSet) -> tuple[RowKey, ...] | None:
    """The patient a child row of a clinical row (an encounter's participant) belongs to: the one its parent row
    belongs to, which the parent's facts keep (`RowFacts.parent`), where the parent's map asks no consent of its
    own but obeys a patient's through a lookup (`gate_table`). () where there is none; None where the parent row's
    facts are not known (no message of it seen): the patient is not known either (found by review: such a row was
    written into the Encounter of a patient who had withdrawn her consent)."""
    table = inherited_gate_table(plan, maps)
    if table is None:
        return ()
    fact = facts.get(parent)
    if fact is None:
        return None
    return ((table, fact.parent),) if fact.parent and fact.parent != NO_PARENT else ()


def consent_rows(decision: Decision, facts: Mapping[RowKey, RowFacts], maps: MapSet) -> set[RowKey]:
    """The rows whose facts `resolve` needs beyond `WritePlan.needs`, known only from the facts read so far: the
    patient a Target-only change of a clinical row belongs to (`remembered_gates`), and a child row's parent
    (named by the row's facts) and the patient that parent belongs to (`inherited_gates`)."""
    rows = set(remembered_gates(decision, facts, maps))
    plan = decision.plan
    if plan is None or plan.gates or not isinstance(plan.writes[0].edit, ItemEdit):
        return rows
    target = plan.writes[0].target
    parent: RowKey | None = target.row
    if _parent_from_facts(plan):
        own = facts.get((plan.source.table, plan.source.record_id))
        parent = (target.table, own.parent) if own is not None and own.parent else None
    if parent is not None:
        rows.add(parent)
        rows.update(inherited_gates(plan, parent, facts, maps) or ())
    return rows


def remembered_gates(decision: Decision, facts: Mapping[RowKey, RowFacts], maps: MapSet) -> tuple[RowKey, ...]:
    """The patient whose consent a Target-only change of a clinical row needs, when its message does not carry
    the lookup (a step without images sends only the changed columns): the one the row's earlier messages named
    (`RowFacts.parent`)."""
    plan = decision.plan
    if plan is None or plan.gates or plan.full:
        return ()
    own = facts.get((plan.source.table, plan.source.record_id))
    entity_map = maps.get(plan.source.table)
    if own is None or not own.parent or entity_map is None:
        return ()
    if _parent_from_facts(plan):  # a child row's: its parent patient
        parent_map = maps.get(plan.target.table)
        return ((plan.target.table, own.parent),) if parent_map is not None and parent_map.consent_types else ()
    if not isinstance(plan.writes[0].edit, RowEdit):
        return ()
    table = next((t for t in (gate_table(a, maps) for a in entity_map.attributes) if t is not None), None)
    return ((table, own.parent),) if table else ()


def remembered_gate_table(plan: WritePlan, maps: MapSet) -> str | None:
    """The table of the patient a Target-only change whose message does not name that patient obeys the consent
    of (`remembered_gates`, which the row's facts name); else None. Which row it is, only the facts read in its
    flight tell: until then, any of that table's rows may be it."""
    if plan.gates or plan.full:
        return None
    entity_map = maps.get(plan.source.table)
    if entity_map is None:
        return None
    if _parent_from_facts(plan):  # a child row's: its parent patient
        parent_map = maps.get(plan.target.table)
        return plan.target.table if parent_map is not None and parent_map.consent_types else None
    if not isinstance(plan.writes[0].edit, RowEdit):
        return None
    return next((t for t in (gate_table(a, maps) for a in entity_map.attributes) if t is not None), None)


# A lookup to a row not written yet (an Observation processed before its Encounter's Create, which Service Bus does
# not order) whose resource a search does not find waits this many retries (`target-pending`) before the reference
# is made by identifier only, the last resort: that reference would stay so until the row is saved again. Retries
# spent waiting for the patient's consent do not count (`resolve`'s `past_gates`): the row's referenced rows waited
# for the same consent, each on its own retry schedule.
REFERENCE_GRACE_RETRIES = 2

# A row of a patient whose recorded consent is No, saved after that was recorded, waits this many retries before
# it is skipped: the message giving consent may still be on its way (Service Bus keeps no order across rows).
CONSENT_GRACE_RETRIES = 2


def resolve(decision: Decision, facts: Mapping[RowKey, RowFacts], maps: MapSet, settings: Settings,
            *, attempt: int = 0, past_gates: int | None = None, created: AbstractSet[RowKey] = frozenset(),
            retried: bool = False, waited: timedelta = timedelta(0), since_gate: timedelta | None = None) -> Decision:
    """The plan with what other rows' facts decide: skipped while a patient it belongs to withholds consent (or waiting
    while that is unknown), stale when a newer change moved a child row to another parent, its parents' FHIR ids,
    its lookups' references. `attempt`: how many times this message was tried before (`past_gates`: of them, those
    that did not wait for a consent; what the waits past that gate count; `since_gate`: since the message, after
    waiting for a consent, first got past it, `retry.gate_opened`); `waited`: since it was first tried
    (`retry.first_tried`; a row saved while its patient had not consented waits WRITEBACK_CONSENT_WAIT_MINUTES for
    the consent). `created`: rows whose Create is among the messages being processed: new rows, whose resource is
    (or will be) made under the row's own id (`decide.resource_id`), so a lookup to one refers to that id."""
    if decision.alternatives or decision.consent_from_facts:
        decision = _as_known(decision, facts, maps, settings)
    tried = attempt if past_gates is None else past_gates
    plan = decision.plan
    if decision.decision != "write" or plan is None:
        return decision
    own = facts.get((plan.source.table, plan.source.record_id))
    first = plan.writes[0]
    gates = plan.gates or remembered_gates(decision, facts, maps)
    if _parent_from_facts(plan):
        if own is None or own.parent is None:
            return evolve(decision, decision="reject", reason=Reason.TARGET_PENDING, plan=None,
                           detail=f"The link to the parent {first.target.table} is not in the message (a step "
                           "without images), and no earlier message of the row has told it yet.")
        if own.parent == NO_PARENT:
            return evolve(decision, decision="reject", reason=Reason.MISSING_PARENT_LINK, plan=None,
                           detail=f"The link to the parent {first.target.table} is not in the message (a step "
                           "without images), and the row's last message that held it had it empty.")
        first = Write(evolve(first.target, identifier_value=own.parent,
                              new_id=resource_id(first.target.table, own.parent)), first.edit)
        plan = evolve(plan, writes=(first, *plan.writes[1:]))
    if own is not None and isinstance(first.edit, RowEdit) and plan.full and own.resource_type is not None and \
            own.resource_type != first.target.resource_type and own.type_at.compare(plan.source.version) == 1:
        # A newer change of the row changed its type: its resource of this type no longer stands for the row
        # (it was released), and an older state must not make it do so again.
        if retried:
            # Its earlier try may have written that resource a version that owes its Provenance: read it under
            # the id it was made with (the row identifier left it with the release), write nothing.
            made_as = own.id_for(first.target.resource_type) or first.target.new_id
            return evolve(decision, plan=evolve(plan, heal_only=True, writes=(
                Write(evolve(first.target, fhir_id=made_as), first.edit),)))
        return evolve(decision, decision="skip", reason=Reason.STALE, plan=None,
                       detail=f"A newer change of this row ({own.type_at.text()}) made it another type than "
                       f"{first.target.resource_type}.")
    if own is not None and own.parent is not None and isinstance(first.edit, ItemEdit) and \
            own.parent != first.target.identifier_value and own.parent_at.compare(plan.source.version) == 1:
        if retried:  # its earlier try may have written this parent a version that still owes its Provenance
            return evolve(decision, plan=evolve(plan, heal_only=True))
        return evolve(decision, decision="skip", reason=Reason.STALE, plan=None,
                       detail=f"A newer change of this row ({own.parent_at.text()}) "
                       + (f"moved it to another {first.target.table}." if own.parent else
                          f"unlinked it from its {first.target.table}."))
    if own is not None and own.echoed and not plan.heal_only and \
            (synced := own.echoed_after(plan.source.version) & plan.columns):
        kept = _sync_kept(plan, synced)
        if kept is None and not retried:
            return evolve(decision, decision="skip", reason=Reason.STALE, plan=None,
                           detail="The FHIR→Dataverse sync set every column this change carries in a later version "
                           "of the row (an echo): FHIR holds those values already.")
        # (a retry with nothing left still looks for the version its earlier try may have written: heal only)
        plan = kept or evolve(plan, heal_only=True)
        decision = evolve(decision, plan=plan, detail=f"{decision.detail[:-1]}; not {', '.join(sorted(synced))}: "
                           "the FHIR→Dataverse sync set them in a later version of the row, as FHIR holds them.")
    inherited_from: RowKey | None = None  # the parent whose patient's consent the row obeys (`inherited_gates`)
    if not gates:
        inherited = inherited_gates(plan, first.target.row, facts, maps)
        if inherited is None:
            return evolve(decision, decision="skip" if settings.consent_unknown == "skip" else "reject",
                           reason=Reason.CONSENT_UNKNOWN, plan=None,
                           detail=f"The patient this row belongs to, through its parent {first.target.table} "
                           f"{first.target.identifier_value}, is not known yet: no message of that row has been "
                           "seen.")
        gates, inherited_from = inherited, first.target.row if inherited else None
    not_patients: set[RowKey] = set()
    held_back = ""
    for table, row_id in gates:
        gate_map = maps.get(table)
        fact = facts.get((table, row_id))
        if fact is not None and fact.resource_type is not None and gate_map is not None and \
                fact.resource_type not in gate_map.consent_types:
            kinds = "/".join(sorted(gate_map.consent_types))
            if fact.type_before in gate_map.consent_types and waited < timedelta(minutes=settings.consent_wait_minutes):
                # A patient until its last type change (made a Practitioner by mistake, and back a minute later):
                # a visit saved meanwhile waits for it to be one again, as a child row does, so that it is written
                # with that patient's consent and refers to its Patient (found by review: it was written at once,
                # with a patient's consent No, and by identifier only). A wait for the patient, as one for its
                # consent: the tries it takes do not use up the grace of the row's lookups (`GATE_WAIT`).
                return evolve(decision, decision="reject", reason=Reason.TARGET_PENDING, plan=None,
                               extra={**decision.extra, GATE_WAIT: True},
                               detail=f"The patient ({table} {row_id}) this row belongs to is not a {kinds} since a "
                               f"change of its type ({fact.retyped.text()}): waiting for it to be one again (up to "
                               f"WRITEBACK_CONSENT_WAIT_MINUTES, {settings.consent_wait_minutes:g} min).")
            if fact.type_before in gate_map.consent_types:
                # Still not one past the wait: the row is skipped, as a child row of such a contact is, whatever
                # the contact's consent column says meanwhile (found by review: the visit of a patient who had
                # withdrawn consent was written once the mistaken type outlasted the wait, and again when the
                # mistaken Practitioner was also set to sync). Made a Patient again, the contact's rows are written
                # at their next save.
                return evolve(decision, decision="skip", reason=Reason.NO_ENTITY_MAP, plan=None,
                               detail=f"The patient ({table} {row_id}) this row belongs to is not a {kinds} since a "
                               f"change of its type ({fact.retyped.text()}), past the wait for it to be one again; "
                               "this table's map writes rows of patients only.")
            not_patients.add((table, row_id))  # a practitioner: no consent to ask, and no patient's id to refer by
            continue
        if fact is None or fact.consent is None:
            detail = (f"The consent of the patient ({table} {row_id}) this row belongs to is not known yet: no "
                      "message of that row has been seen.")
            if fact is not None:  # seen, without the column (found by an administrator's trial: "no message seen")
                column = (gate_map.consent_column if gate_map else None) or settings.consent_column
                detail = (f"The consent of the patient ({table} {row_id}) this row belongs to is not known: that "
                          f"row's messages do not hold its consent column {column} (WRITEBACK_CONSENT_COLUMN, or "
                          "the map's consent.column). Check that the setting names the column's logical name and "
                          "that the contact step's images include it (docs/deploy.md), then save the contact.")
            # "reject" with a transient reason: retried with a growing delay, like any transient outcome
            return evolve(decision, decision="skip" if settings.consent_unknown == "skip" else "reject",
                           reason=Reason.CONSENT_UNKNOWN, detail=detail, plan=None)
        if not fact.consent:
            leaving = [w for w in plan.writes if isinstance(w.edit, RemoveItem)]
            # Saved while the patient had not consented (a consent given meanwhile may be on its way: a short
            # grace), or within the consent wait, whatever the order: a later save of the patient still without
            # consent (an address fixed before the form is signed) says No again, and must not end the wait. A
            # move waits the grace only: the patient it leaves must lose the item.
            if (attempt < CONSENT_GRACE_RETRIES and fact.consent_at.compare(plan.source.version) == -1) or (
                    waited < timedelta(minutes=settings.consent_wait_minutes) and not leaving):
                return evolve(decision, decision="reject", reason=Reason.CONSENT_UNKNOWN, plan=None,
                               detail=f"The patient ({table} {row_id}) this row belongs to had not consented when "
                               "last seen: waiting for a consent (up to WRITEBACK_CONSENT_WAIT_MINUTES, "
                               f"{settings.consent_wait_minutes:g} min).")
            if leaving and first.target.row in ((table, row_id), inherited_from) and isinstance(first.edit, ItemEdit):
                # A child row moved to this patient (or to a visit of theirs): it is not added there, but it still
                # leaves the patient (the visit) it was moved from (an MRN kept on the wrong patient is a
                # misidentification; found by review for a visit's participant).
                plan = evolve(plan, writes=tuple(leaving))
                held_back = f"not added to {table} {row_id} (that patient has not consented)"
                continue
            return evolve(decision, decision="skip", reason=Reason.CONSENT_WITHHELD, plan=None,
                           detail=f"The patient ({table} {row_id}) this row belongs to has not consented."
                           + _left_behind(decision, maps, (table, row_id)))
    writes: list[Write] = []
    notes: list[str] = [held_back] if held_back else []
    for write in plan.writes:
        target, edit = write.target, write.edit
        fact = facts.get(target.row)
        if isinstance(edit, ItemEdit | RemoveItem) and fact is not None and fact.resource_type is not None \
                and fact.resource_type != target.resource_type:
            if isinstance(edit, RemoveItem):
                # The old parent is of another type now. The resource of this type it had before (a Patient
                # released when the contact was made a Practitioner) no longer carries the row identifier, but
                # still holds the item, and is taken up again if the contact is made a Patient again (found by
                # review): the item leaves it, found by its id. Where there is none, there is nothing to remove.
                made_as = fact.id_for(target.resource_type) or target.new_id
                writes.append(Write(evolve(target, fhir_id=made_as, fhir_id_unsure=False), edit))
                continue
            if fact.type_before == target.resource_type and \
                    waited < timedelta(minutes=settings.consent_wait_minutes):
                # The parent was one until its last type change (made a Practitioner by mistake, and back a minute
                # later): as for a consent, a short change of the parent must not lose the row for good, saved
                # before it or meanwhile (found by review). A contact that never was one skips it at once.
                return evolve(decision, decision="reject", reason=Reason.TARGET_PENDING, plan=None,
                               extra={**decision.extra, GATE_WAIT: True},
                               detail=f"The parent {target.table} {target.identifier_value} is not a "
                               f"{target.resource_type} since a change of its type ({fact.retyped.text()}): "
                               "waiting for it to be one again (up to WRITEBACK_CONSENT_WAIT_MINUTES, "
                               f"{settings.consent_wait_minutes:g} min).")
            return evolve(decision, decision="skip", reason=Reason.NO_ENTITY_MAP, plan=None,
                           detail=f"The parent {target.table} {target.identifier_value} is not a "
                           f"{target.resource_type}; this table's map writes into {target.resource_type} only.")
        if isinstance(edit, RemoveItem) and fact is not None and fact.consent:
            edit = evolve(edit, awaited=True)
        # A removal goes whatever the old parent's consent: what it takes away is the child row's, which belongs
        # to another patient now (an MRN left on a patient who withdrew consent would stay there for good, under
        # the wrong patient). Where that patient has no resource, there is nothing to remove.
        # Only a FHIR id the row came with (msemr_azurefhirid) changes how the resource is read: one this product
        # wrote is found by the row identifier it carries, the read sent ahead while the batch was planned.
        # An id the facts know to name a resource of another type (the row's type changed since) names none of
        # this one: it is found or made by the row identifier.
        fhir_id, unsure = target.fhir_id, target.fhir_id_unsure
        # A newer save's id, or its clearing of the id, wins over this message's (an older one resubmitted after
        # the administrator cleared the id of a resource gone from the server).
        if fact is not None and (fhir_id is None or fhir_id == fact.fhir_id or (
                fact.fhir_id is not None and target.row == (plan.source.table, plan.source.record_id)
                and fact.version.compare(plan.source.version) == 1)):
            fhir_id = fact.fhir_id_for(target.resource_type)
            # The facts tell which type the id was given under when they know it (older messages saw it first).
            unsure = fhir_id is not None and fact.fhir_type is None and unsure
            if fhir_id is not None and fact.fhir_type is None and (made := fact.written_id(target.resource_type)):
                # (as `RowFacts.id_for`: the resource found carrying the row, or made for it, is surely the row's;
                # a child row of a contact made a Patient was added to the unrelated one sharing its id)
                fhir_id, unsure = made, False
        if unsure and tried >= REFERENCE_GRACE_RETRIES:
            # No earlier message told which type the id was given under: the resource is found by the row
            # identifier, never taken over by an id that may be another resource's.
            fhir_id, unsure = None, False
        if fhir_id != target.fhir_id or unsure != target.fhir_id_unsure:
            target = evolve(target, fhir_id=fhir_id, fhir_id_unsure=unsure)
        writes.append(Write(target, edit) if target is not write.target or edit is not write.edit else write)
        made = fact.written if fact is not None and fact.written else ""
        left = made.split("/", 1)[1] if made.startswith(f"{target.resource_type}/") else None
        if isinstance(edit, RowEdit) and fhir_id and not unsure and left and left != fhir_id \
                and not plan.heal_only and target.row == (plan.source.table, plan.source.record_id):
            # The row's FHIR id names another resource than the one this product made or found for it (the sync
            # linked the contact to the lab's Patient): that one no longer stands for the row, which would
            # otherwise have two resources carrying its identifier (found by review). It is released, as a
            # resource of a type the row left is.
            writes.append(Write(evolve(target, fhir_id=left, fhir_id_unsure=False, may_exist=False, by_id_only=True),
                                Release(edit.mark, target.identity)))
    if not writes:  # an unlinked child row whose previous parent withholds consent, or is no such resource
        return evolve(decision, decision="skip", reason=Reason.CONSENT_WITHHELD if notes else Reason.NO_CHANGE,
                       plan=None, detail=f"Nothing to write: {'; '.join(notes) or 'no item of it to remove'}.")
    ref_ids: dict[RowRef, str] = {}
    for ref in plan.refs:
        fact = facts.get((ref.table, ref.row_id))
        known = fact.id_for(ref.resource_type) if fact is not None else None
        if known is None and (ref.table, ref.row_id) in created and (
                fact is None or fact.resource_type in (None, ref.resource_type)):
            known = resource_id(ref.table, ref.row_id)
        if known:
            ref_ids[ref] = known
    detail = decision.detail if not notes else decision.detail[:-1] + "; " + "; ".join(notes) + "."
    # A message that waited for the consent waits for the rows it refers to as long as their retries, which
    # waited for the same consent, may take to come (twice the longest retry delay), not just its own two tries.
    grace = tried < REFERENCE_GRACE_RETRIES or (
        since_gate is not None and since_gate < timedelta(seconds=2 * settings.retry_max_delay_seconds))
    awaited = frozenset(ref for ref in plan.refs if ref not in ref_ids and grace
                        and getattr(facts.get((ref.table, ref.row_id)), "resource_type", None) != NOT_WRITABLE)
    return evolve(decision, detail=detail, plan=evolve(plan, writes=tuple(writes), ref_ids=ref_ids, awaited=awaited,
                                                         gates=tuple(g for g in plan.gates if g not in not_patients)))
