"""Value objects: the immutable records the core passes from step to step (messages, plans, decisions, results).

`@immutable` is `@dataclass(frozen=True, slots=True)` to the type checker, which refuses an assignment to a field
(`mypy --strict` runs in `make test`; it does not catch `del`, which nothing here uses). At run time the class is
built without frozen's guard, so that making one does not go through `object.__setattr__` for every field: that
guard was an eighth of the instructions of planning a message (measured with callgrind over the bench corpus).
Equality and hashing are frozen's own (every field), so values still serve as keys."""

from __future__ import annotations

import dataclasses
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def immutable(cls: type[_T]) -> type[_T]:
    return dataclasses.dataclass(slots=True, unsafe_hash=True)(cls)
