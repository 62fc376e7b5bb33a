"""UCUM normalisation: known conversions are exact, anything doubtful is refused (None), never mis-scaled."""
from __future__ import annotations

import pytest

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.units import canonical_unit, convert

GLUCOSE = {"system": codes.LOINC, "code": "2345-7"}
HBA1C = {"system": codes.LOINC, "code": "4548-4"}
CRP = {"system": codes.LOINC, "code": "1988-5"}


@pytest.mark.parametrize("value, unit, target, analyte, expected", [
    (5.5, "mmol/L", "mg/dL", GLUCOSE, 99.0858),  # 5.5 × 18.0156
    (99.0858, "mg/dL", "mmol/L", GLUCOSE, 5.5),
    (1.0, "g/L", "mg/dL", GLUCOSE, 100.0),
    (5500.0, "umol/L", "mmol/L", GLUCOSE, 5.5),
    (48.0, "mmol/mol", "%", HBA1C, 6.543),  # IFCC -> NGSP master equation: 0.09148 × 48 + 2.152
    (6.543, "%", "mmol/mol", HBA1C, 48.0),
    (12.0, "mg/L", "mg/dL", CRP, 1.2),
    (1.2, "mg/dL", "mg/L", CRP, 12.0),
    (3.0, "ug/mL", "mg/L", CRP, 3.0),
    (16.0, "kPa", "mm[Hg]", {}, 120.0102),
    (120.0, "mm[Hg]", "kPa", {}, 15.9987),
    (0.5, "1", "%", {}, 50.0),
])
def test_known_conversions(value, unit, target, analyte, expected):
    assert convert(value, unit, target, **analyte) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("unit, target", [
    ("mg/dl", "mg/dL"), ("MG/DL", "mg/dL"), ("mmHg", "mm[Hg]"), ("mm Hg", "mm[Hg]"), ("kg/m^2", "kg/m2"),
    ("kg/m²", "kg/m2"), ("µg/mL", "ug/mL"), ("mmol/l", "mmol/L"),
])
def test_spellings_are_the_same_unit(unit, target):
    assert canonical_unit(unit) == target
    assert convert(7.0, unit, target) == 7.0


@pytest.mark.parametrize("unit, target, analyte", [
    ("mmol/L", "mg/dL", CRP),  # no molar mass for CRP in the table: refuse, do not guess
    ("mmol/L", "mg/dL", {}),  # no analyte named at all
    ("mmol/mol", "%", GLUCOSE),  # the HbA1c bridge belongs to HbA1c only
    ("%", "mmol/mol", {}),  # a percentage is not an IFCC ratio without the master equation
    ("mg", "mg/dL", GLUCOSE),  # a mass is not a concentration
    ("mg/dL", "mm[Hg]", GLUCOSE),
    ("furlongs", "mg/dL", GLUCOSE),  # outside the table
    ("mg/dL", "furlongs", GLUCOSE),
    (None, "mg/dL", GLUCOSE),  # unitless lab values are ambiguous
    ("  ", "mg/dL", GLUCOSE),
])
def test_unconvertible_is_none(unit, target, analyte):
    assert convert(5.0, unit, target, **analyte) is None


def test_unknown_unit_converts_only_to_itself():
    assert convert(3.0, "{score}", "{score}") == 3.0
    assert convert(3.0, "{Score}", "{score}") == 3.0
    assert convert(3.0, "{score}", "{points}") is None
