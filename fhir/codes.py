"""Every code system URI and code that `dicom_fusion.fhir` reads or emits, in one place.

Keeping them here means a terminology review (or a site that needs a different report code) touches one
file, and the builders cannot drift apart by spelling a system URI two ways.
"""
from __future__ import annotations

from typing import Final

# ---- code systems -------------------------------------------------------------------------------------
LOINC: Final = "http://loinc.org"
SNOMED_CT: Final = "http://snomed.info/sct"
RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM: Final = "http://unitsofmeasure.org"
DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
V2_DIAGNOSTIC_SERVICE_SECTION: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_IDENTIFIER_TYPE: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
V3_ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

# ---- identifier systems -------------------------------------------------------------------------------
#: DICOM UIDs as FHIR identifiers: system urn:dicom:uid, value urn:oid:<uid> (FHIR R4 ImagingStudy guidance).
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
#: Identifiers that are themselves URIs (we use deterministic urn:uuid values for derived Observations).
URI_SYSTEM: Final = "urn:ietf:rfc:3986"

# ---- codes we emit ------------------------------------------------------------------------------------
#: DiagnosticReport.category: HL7 v2 table 0074 "RAD" (Radiology).
CATEGORY_RADIOLOGY: Final = ("RAD", "Radiology")
#: Observation.category for imaging-derived observations.
OBSERVATION_CATEGORY_IMAGING: Final = ("imaging", "Imaging")
#: DiagnosticReport.code: LOINC 18748-4.
REPORT_CODE: Final = ("18748-4", "Diagnostic imaging study")
#: Code of the Observation that carries the model's finding as valueCodeableConcept (same concept the SR
#: uses for its finding in TID 1500).
FINDING_OBSERVATION_CODE: Final = ("121071", "Finding")
#: The finding when the model's calibrated probability lies in its card's indeterminate band (SNOMED CT
#: 82334004 |Indeterminate (qualifier value)|; the model card and the SR, outputs/concepts.py, use the same).
INDETERMINATE_FINDING: Final = ("82334004", "Indeterminate")
#: Identifier.type for the accession number (HL7 v2 table 0203 "ACSN").
ACCESSION_TYPE: Final = ("ACSN", "Accession ID")
#: UCUM unity: probabilities are reported as a fraction 0..1.
UCUM_UNITY: Final = "1"

#: Machine-readable flag on the DiagnosticReport: true when the EHR timeline was not used.
IMAGE_ONLY_EXTENSION_URL: Final = "urn:dicom-fusion:fhir:StructureDefinition:image-only"
