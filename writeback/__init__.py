"""Dataverse → FHIR writeback: a pure core (messages, maps, mapping, decide) and thin I/O adapters.

The core is compiled by mypyc where it is built (setup.py); `build.guard` keeps a checkout from running compiled
modules older than their sources."""

from writeback import build

build.guard(__name__)
