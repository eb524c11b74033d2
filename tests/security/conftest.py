"""The security tests reuse the delivery rig (real FHIR dev server behind a FaultyTransport)."""

from __future__ import annotations

from tests.delivery.conftest import fhir, maps, rig_factory

__all__ = ["fhir", "maps", "rig_factory"]
