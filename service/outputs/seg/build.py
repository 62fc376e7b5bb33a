"""Lesion segmentation outputs: a DICOM Segmentation (highdicom, binary) and its SR measurement group.

The SEG holds one segment ("Lesion", SNOMED CT codes from the segmentation card) on the grid of the
image(s) the model read: the one radiograph for 2D models, the slices of the series (in slice-position
order) for 3D ones. It joins the source study and patient, references the source images, and takes its
UIDs from the SR's (`derive_seg_uids`), with every date pinned to the job's creation time, so a
redelivered task stores byte-identical objects and the PACS keeps one copy.

The measurement is taken from the same mask in source pixels: area in mm² (2D, PixelSpacing, else
ImagerPixelSpacing) or volume in mm³ (3D, PixelSpacing x slice spacing). In the SR it is a TID 1410
"Planar ROI" (2D) or TID 1411 "Volumetric ROI" (3D) measurement group that references the SEG segment,
with the segmenter as algorithm and the lesion's centroid (source pixel coordinates) as a TEXT item.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from dicom_fusion.service.outputs import concepts
from dicom_fusion.service.outputs.identity import MANUFACTURER, derive_seg_uids

SERIES_NUMBER = 997  # next to the saliency SC's 998 and the SR's 999
SEGMENT_NUMBER = 1


@dataclass(frozen=True)
class SegmentCodes:
    """What the segment is (from the segmentation card's [segment] table), as SNOMED CT codes."""

    label: str
    type_code: str
    type_display: str
    category_code: str
    category_display: str

    def property_type(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.type_code, "SCT", self.type_display)

    def property_category(self) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(self.category_code, "SCT", self.category_display)


@dataclass(frozen=True)
class LesionMeasurement:
    """Size of the segmented lesion on the source grid; `kind` is "area" (mm²) or "volume" (mm³)."""

    kind: str
    value: float
    voxels: int
    spacing: tuple[float, ...]  # mm per source pixel: (row, col) or (slice, row, col)
    centroid: tuple[float, ...]  # source pixel coordinates (slice?, row, col), 0-based
    bbox: tuple[int, ...]  # inclusive (min..., max...) per axis

    @property
    def unit(self) -> str:
        return "mm2" if self.kind == "area" else "mm3"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LesionMeasurement:
        return cls(kind=str(data["kind"]), value=float(data["value"]),  # type: ignore[arg-type]
                   voxels=int(data["voxels"]),  # type: ignore[call-overload]
                   spacing=tuple(float(v) for v in data["spacing"]),  # type: ignore[attr-defined]
                   centroid=tuple(float(v) for v in data["centroid"]),  # type: ignore[attr-defined]
                   bbox=tuple(int(v) for v in data["bbox"]))  # type: ignore[attr-defined]

    def centroid_text(self) -> str:
        axes = ("slice", "row", "column")[-len(self.centroid):]
        where = ", ".join(f"{a} {v:.1f}" for a, v in zip(axes, self.centroid, strict=True))
        return f"{concepts.LESION_CENTROID_PREFIX}: {where} (source pixels, 0-based)"


def source_spacing(sources: Sequence[Dataset]) -> tuple[float, ...]:
    """mm per pixel of the sources: (row, col) for one image, (slice, row, col) for a series of slices."""
    first = sources[0]
    pair = first.get("PixelSpacing") or first.get("ImagerPixelSpacing")
    if not pair:
        raise ValueError("The source image has neither PixelSpacing nor ImagerPixelSpacing: no area in mm².")
    inplane = (float(pair[0]), float(pair[1]))
    if len(sources) == 1:
        return inplane
    try:
        ori = np.asarray([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(ori[:3], ori[3:])
        pos = [float(np.dot(normal, [float(v) for v in s.ImagePositionPatient])) for s in sources]
        gaps = np.diff(np.asarray(pos))
        step = float(np.median(np.abs(gaps))) if gaps.size else 0.0
    except (AttributeError, TypeError, ValueError):
        step = 0.0
    if step <= 0.0:
        step = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 0.0)
    if step <= 0.0:
        raise ValueError("The source slices have no spacing (positions, SpacingBetweenSlices, SliceThickness).")
    return (step, *inplane)


def measure_lesion(mask: np.ndarray, sources: Sequence[Dataset]) -> LesionMeasurement:
    """Area (2D) or volume (3D) of `mask` (source grid; 3D in the order of `sources`)."""
    mask = np.asarray(mask) > 0
    spacing = source_spacing(sources)
    if mask.ndim != len(spacing):
        raise ValueError(f"mask has {mask.ndim} axes but {len(sources)} source image(s) give {len(spacing)}")
    voxels = int(mask.sum())
    if voxels == 0:
        raise ValueError("The mask is empty: there is no lesion to measure.")
    points = np.argwhere(mask)
    return LesionMeasurement(
        kind="area" if mask.ndim == 2 else "volume",
        value=float(voxels * math.prod(spacing)),
        voxels=voxels,
        spacing=tuple(spacing),
        centroid=tuple(float(v) for v in points.mean(axis=0)),
        bbox=(*(int(v) for v in points.min(axis=0)), *(int(v) for v in points.max(axis=0))),
    )


def build_segmentation(
    sources: Sequence[Dataset],
    mask: np.ndarray,
    *,
    sr_instance_uid: str,
    segment: SegmentCodes,
    model_name: str,
    model_version: str,
    content_datetime: datetime,
) -> hd.seg.Segmentation:
    """Binary SEG of `mask` ([rows, cols] for one source image, [slices, rows, cols] in `sources` order)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("The mask is empty: a SEG needs at least one lesion pixel.")
    if mask.ndim == 2:
        if len(sources) != 1:
            raise ValueError(f"A 2D mask goes with one source image, got {len(sources)}.")
        frames = mask[np.newaxis]
    elif mask.shape[0] != len(sources):
        raise ValueError(f"The mask has {mask.shape[0]} slices but {len(sources)} source images were given.")
    else:
        frames = mask
    series_uid, sop_uid = derive_seg_uids(sr_instance_uid)
    when = content_datetime.astimezone().replace(tzinfo=None) if content_datetime.tzinfo else content_datetime
    description = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=segment.label[:64],
        segmented_property_category=segment.property_category(),
        segmented_property_type=segment.property_type(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model_name[:64], version=model_version[:64], family=dcm_codes.cid7162.ArtificialIntelligence),
        tracking_uid=generate_uid(entropy_srcs=[sr_instance_uid, "lesion", "1"]),
        tracking_id=f"{concepts.LESION_TRACKING_PREFIX} 1",
    )
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
        device_serial_number="0",
        series_description=f"AI lesion segmentation {model_name}"[:64],
        content_label="LESION",
        content_description=f"Lesion segmented by {model_name} {model_version}"[:64],
        omit_empty_frames=True,
    )
    # highdicom draws a random dimension organization UID: derive it, so redelivery gives the same bytes
    organisation = generate_uid(entropy_srcs=[sr_instance_uid, "segmentation dimension organization"])
    for item in (*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])):
        item.DimensionOrganizationUID = organisation
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # General Image type 2C without a frame of reference (projection radiographs): the source's own
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    seg.ContentDate, seg.ContentTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    seg.InstanceCreationDate, seg.InstanceCreationTime = seg.ContentDate, seg.ContentTime
    seg.SeriesDate, seg.SeriesTime = seg.ContentDate, seg.ContentTime
    for item in seg.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    return seg


def lesion_measurement_group(
    segmentation: Dataset,
    sources: Sequence[Dataset],
    measurement: LesionMeasurement,
    *,
    sr_instance_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 (area) / 1411 (volume) group for the SEG's segment, with the segmenter as algorithm."""
    described = segmentation.SegmentSequence[0]
    algorithm = described.SegmentationAlgorithmIdentificationSequence[0]
    finding = hd.sr.CodedConcept.from_dataset(described.SegmentedPropertyTypeCodeSequence[0])
    tracking = hd.sr.TrackingIdentifier(
        uid=str(described.TrackingUID), identifier=str(described.TrackingID))
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=str(algorithm.AlgorithmName), version=str(algorithm.AlgorithmVersion))
    value = hd.sr.Measurement(
        name=concepts.LESION_AREA if measurement.kind == "area" else concepts.LESION_VOLUME,
        value=measurement.value,
        unit=concepts.AREA_UNIT if measurement.kind == "area" else concepts.VOLUME_UNIT,
        algorithm_id=algorithm_id,
    )
    common = {"tracking_identifier": tracking, "finding_type": finding, "algorithm_id": algorithm_id,
              "measurements": [value]}
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | \
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    if measurement.kind == "area":
        source = sources[0]
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                frame_number=1, segment_number=SEGMENT_NUMBER,
                source_image=hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)),
            **common,  # type: ignore[arg-type]
        )
        # The Image SOP Instance Reference Macro forbids Referenced Segment Number next to Referenced Frame
        # Number (dciodvfy error); the frame identifies the segment through the SEG's per-frame groups.
        for item in group[0].ContentSequence:
            if item.get("ValueType") == "IMAGE" and "ReferencedFrameNumber" in item.ReferencedSOPSequence[0]:
                del item.ReferencedSOPSequence[0].ReferencedSegmentNumber
    else:
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=SEGMENT_NUMBER,
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)),
            **common,  # type: ignore[arg-type]
        )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=concepts.LESION_CENTROID_COMMENT, value=measurement.centroid_text(),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if measurement.kind == "area":
        group[0].ContentSequence.extend(_planar_coordinates(measurement, sources[0]))
    return group


def _planar_coordinates(measurement: LesionMeasurement, source: Dataset) -> list[hd.sr.ScoordContentItem]:
    """Centroid (POINT) and bounding box (closed POLYLINE) as SCOORD items SELECTED FROM the source image,
    so a viewer can mark them. SCOORD (column, row) puts (0, 0) at the top-left corner of the first
    pixel: the centre of 0-based pixel (r, c) is (c + 0.5, r + 0.5); the box runs along the pixel edges."""
    row, col = measurement.centroid
    r0, c0, r1, c1 = measurement.bbox
    box = [[c0, r0], [c1 + 1, r0], [c1 + 1, r1 + 1], [c0, r1 + 1], [c0, r0]]
    items = []
    for name, graphic_type, data in (
        (concepts.LESION_CENTER, hd.sr.GraphicTypeValues.POINT, [[col + 0.5, row + 0.5]]),
        (concepts.LESION_EXTENT, hd.sr.GraphicTypeValues.POLYLINE, box),
    ):
        item = hd.sr.ScoordContentItem(
            name=name, graphic_type=graphic_type, graphic_data=np.asarray(data, dtype=np.float64),
            pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.VOLUME,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        item.ContentSequence = [hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)]
        items.append(item)
    return items


def seg_mask(segmentation: Dataset) -> np.ndarray:
    """The SEG's frames as uint8 0/1 ([rows, cols] for one frame, else [frames, rows, cols] as stored;
    empty frames are omitted, see PerFrameFunctionalGroupsSequence for their source slices)."""
    pixels = np.asarray(segmentation.pixel_array)  # pydicom unpacks the 1-bit frames: 0/1
    return (pixels > 0).astype(np.uint8)


__all__ = [
    "SERIES_NUMBER",
    "LesionMeasurement",
    "SegmentCodes",
    "build_segmentation",
    "derive_seg_uids",
    "lesion_measurement_group",
    "measure_lesion",
    "seg_mask",
    "source_spacing",
]
