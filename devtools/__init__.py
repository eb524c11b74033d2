"""Development helpers: local FHIR server and Azurite launchers for tests and the demo."""
