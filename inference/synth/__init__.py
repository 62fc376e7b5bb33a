"""The synthetic cohort generator (DX studies + FHIR bundles with a learnable label)."""
