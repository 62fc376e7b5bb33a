"""`dicom-fusion demo` and the loopback peers (FHIR server, PACS, Redis) it and the tests start."""
