"""Clients of the peer systems, built from settings (today: the FHIR server).

One place turns ``[fhir]`` settings into a client, so the worker's timeline and delivery stages and the
readiness check talk to the EHR with the same authentication, TLS and timeouts.
"""
from __future__ import annotations

from dicom_fusion.fhir.client import FhirAuth, FhirClient
from dicom_fusion.service.config import FhirSettings


def make_fhir_client(fhir: FhirSettings) -> FhirClient:
    """The FHIR client of the ``[fhir]`` settings (auth mode, CA bundle or TLS verification, retries)."""
    auth = None
    if fhir.auth_mode != "none":
        auth = FhirAuth(mode=fhir.auth_mode, token=fhir.token or None, token_url=fhir.token_url or None,
                        client_id=fhir.client_id or None, client_secret=fhir.client_secret or None,
                        scope=fhir.scope)
    verify: bool | str = str(fhir.ca_file) if fhir.ca_file else fhir.verify_tls
    return FhirClient(fhir.base_url, timeout=fhir.timeout, auth=auth, retries=fhir.retries, verify=verify,
                      page_size=fhir.page_size)
