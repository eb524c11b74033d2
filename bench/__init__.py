"""`make bench`: throughput of the core path and of delivery against the FHIR dev server (see __main__)."""
