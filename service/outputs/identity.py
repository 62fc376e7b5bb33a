"""Who the service says it is in the objects it writes, and every UID it derives.

Derived UIDs are the idempotency keys of delivery (docs/architecture.md, "UID derivations"): a
redelivered task derives the same SR, SEG and SC UIDs, so the PACS sees one object, not duplicates,
and the FHIR report (identified by the SR's SOP Instance UID) is created once. Each UID is
``pydicom.uid.generate_uid(entropy_srcs=[...])`` over a fixed label and its inputs, so changing a
label here changes every UID the service emits for old studies: never do it silently.
"""
from __future__ import annotations

from pydicom.uid import generate_uid

#: Manufacturer of every object the service writes (SR, SEG, SC), also the SR device observer's.
MANUFACTURER = "dicom-fusion"


def device_observer_uid(model_name: str) -> str:
    """UID of the model as an SR device observer: the same for every SR of that model."""
    return generate_uid(entropy_srcs=["dicom-fusion device observer", model_name])


def derive_sr_uids(
    study_instance_uid: str, model_name: str, model_version: str, revision: int = 1
) -> tuple[str, str]:
    """Return ``(series_uid, sop_instance_uid)`` of the SR for a study, model and job revision.

    A redelivered task derives the same UIDs (so the PACS sees one SR, not duplicates); a later
    revision of the job (late instances) gets new ones, so the new SR does not silently replace or
    get dropped as a duplicate of the old one.
    """
    if not isinstance(revision, int) or revision < 1:
        raise ValueError(f'Argument "revision" must be a positive int, got {revision!r}.')
    base = ["dicom-fusion SR", study_instance_uid, model_name, model_version]
    series = generate_uid(entropy_srcs=[*base, "series"])
    instance = generate_uid(entropy_srcs=[*base, "instance", str(revision)])
    return series, instance


def derive_verified_sr_uid(preliminary_sr_uid: str) -> str:
    """SOP Instance UID of the VERIFIED SR that replaces an UNVERIFIED one already sent to the PACS (review
    mode with `release.send_preliminary_sr`): a new instance in the same series, referencing its predecessor."""
    return generate_uid(entropy_srcs=["dicom-fusion verified SR", preliminary_sr_uid])


def derive_seg_uids(sr_instance_uid: str) -> tuple[str, str]:
    """(series_uid, sop_instance_uid) of the SEG that goes with the SR `sr_instance_uid`."""
    base = ["dicom-fusion segmentation", sr_instance_uid]
    return generate_uid(entropy_srcs=[*base, "series"]), generate_uid(entropy_srcs=[*base, "instance"])


def derive_saliency_uids(sr_instance_uid: str) -> tuple[str, str]:
    """(series_uid, sop_instance_uid) of the saliency SC that goes with the SR `sr_instance_uid`."""
    base = ["dicom-fusion saliency", sr_instance_uid]
    return generate_uid(entropy_srcs=[*base, "series"]), generate_uid(entropy_srcs=[*base, "instance"])
