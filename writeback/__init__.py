"""Dataverse → FHIR writeback: a pure core (messages, maps, mapping, decide) and thin I/O adapters."""
