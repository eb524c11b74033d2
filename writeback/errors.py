"""Exceptions that carry a reason code and a detail safe to log (ids and names of fields, never values)."""

from __future__ import annotations

from writeback.reasons import Reason


class WritebackError(Exception):
    """A failure with a documented reason code. `detail` must never hold patient data."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class NotApplied(WritebackError):
    """A write the server answered, every time it was sent, without applying it (e.g. 503): unlike a request
    whose answer never came, it is known not to have changed anything."""


class TargetGone(WritebackError):
    """`target-missing` because the resource a row's FHIR id names is not on the server (404 or 410): `row` (table,
    row id) and `reference` (`Type/<id>`) tell the row facts, so that no lookup names it any more."""

    def __init__(self, row: tuple[str, str], reference: str, detail: str) -> None:
        super().__init__(Reason.TARGET_MISSING, detail)
        self.row = row
        self.reference = reference


class ConfigError(WritebackError):
    """A missing or invalid setting or map: the message is kept (abandoned), never dead-lettered."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(Reason.CONFIG_ERROR, f"setting {setting} {problem}")
        self.setting = setting


class MapError(WritebackError):
    """An entity map file failed validation; names the file and the field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        super().__init__(Reason.CONFIG_ERROR, f"entity map {file}: field `{field}` {problem}")
        self.file = file
        self.field = field
