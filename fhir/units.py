"""UCUM unit normalisation for timeline values: bring each lab value to the unit the model was trained on.

Sites report the same analyte in different units (glucose in mg/dL in the US, mmol/L in Europe). A value
fed to the model in the wrong unit is silently mis-scaled by a factor of 18, so this module converts only
what it knows how to convert and answers None for everything else — the caller drops those values.

Two kinds of conversion, both from small explicit tables:
- within one dimension (mass concentration g/L, substance concentration mol/L, pressure, ...), by the
  UCUM prefixes/scales of the units listed in `_UNITS`;
- across dimensions only for an analyte with a documented bridge in `_BRIDGES`, keyed by LOINC code:
  glucose mass ↔ substance concentration (molar mass 180.156 g/mol), HbA1c NGSP % ↔ IFCC mmol/mol
  (master equation NGSP = 0.09148 × IFCC + 2.152).

Unit strings are matched exactly first, then case-insensitively and through a few common non-UCUM
spellings (`mg/dl`, `mmHg`, `kg/m^2`, `µg/mL`); an unknown unit converts only to itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from dicom_fusion.fhir import codes

MASS_CONC: Final = "mass concentration"  # base g/L
SUBST_CONC: Final = "substance concentration"  # base mol/L
PRESSURE: Final = "pressure"  # base Pa
AREAL_MASS: Final = "mass per area"  # base kg/m2
FRACTION: Final = "fraction"  # base 1 (so % = 0.01)
SUBST_RATIO: Final = "substance ratio"  # base mol/mol (IFCC HbA1c); not interchangeable with FRACTION


@dataclass(frozen=True)
class _Unit:
    dimension: str
    scale: float  # value × scale = value in the dimension's base unit


_UNITS: Final[dict[str, _Unit]] = {
    "g/L": _Unit(MASS_CONC, 1.0),
    "g/dL": _Unit(MASS_CONC, 10.0),
    "mg/mL": _Unit(MASS_CONC, 1.0),
    "mg/dL": _Unit(MASS_CONC, 1e-2),
    "mg/L": _Unit(MASS_CONC, 1e-3),
    "ug/mL": _Unit(MASS_CONC, 1e-3),
    "ug/dL": _Unit(MASS_CONC, 1e-5),
    "ug/L": _Unit(MASS_CONC, 1e-6),
    "ng/mL": _Unit(MASS_CONC, 1e-6),
    "mol/L": _Unit(SUBST_CONC, 1.0),
    "mmol/L": _Unit(SUBST_CONC, 1e-3),
    "umol/L": _Unit(SUBST_CONC, 1e-6),
    "nmol/L": _Unit(SUBST_CONC, 1e-9),
    "Pa": _Unit(PRESSURE, 1.0),
    "kPa": _Unit(PRESSURE, 1e3),
    "mm[Hg]": _Unit(PRESSURE, 133.322387415),
    "kg/m2": _Unit(AREAL_MASS, 1.0),
    "%": _Unit(FRACTION, 1e-2),
    "1": _Unit(FRACTION, 1.0),
    "mmol/mol": _Unit(SUBST_RATIO, 1e-3),
}

#: Common spellings seen in the wild (keys casefolded, spaces removed) -> UCUM code.
_ALIASES: Final[dict[str, str]] = {
    "mmhg": "mm[Hg]",
    "kg/m^2": "kg/m2",
    "kg/m²": "kg/m2",
    "µg/ml": "ug/mL",
    "μg/ml": "ug/mL",
    "mcg/ml": "ug/mL",
    "µg/l": "ug/L",
    "μg/l": "ug/L",
    "µmol/l": "umol/L",
    "μmol/l": "umol/L",
    "percent": "%",
}

_Convert = Callable[[float], float]


@dataclass(frozen=True)
class _Bridge:
    """Analyte-specific conversion between two dimensions, in their base units."""

    a: str
    b: str
    a_to_b: _Convert
    b_to_a: _Convert


_GLUCOSE_G_PER_MOL: Final = 180.156
_glucose = _Bridge(MASS_CONC, SUBST_CONC, lambda g_per_l: g_per_l / _GLUCOSE_G_PER_MOL,
                   lambda mol_per_l: mol_per_l * _GLUCOSE_G_PER_MOL)
# NGSP/DCCT % = 0.09148 × IFCC mmol/mol + 2.152 (IFCC-NGSP master equation); in base units 1 and mol/mol.
_hba1c = _Bridge(SUBST_RATIO, FRACTION, lambda mol_per_mol: (0.09148 * mol_per_mol * 1e3 + 2.152) / 100,
                 lambda fraction: (fraction * 100 - 2.152) / 0.09148 / 1e3)

#: (code system, code) -> bridge. Glucose: serum/plasma, blood, capillary (glucometer), fasting.
_BRIDGES: Final[dict[tuple[str, str], _Bridge]] = {
    **{(codes.LOINC, c): _glucose for c in ("2345-7", "2339-0", "41653-7", "1558-6", "14749-6", "15074-8")},
    **{(codes.LOINC, c): _hba1c for c in ("4548-4", "17856-6", "59261-8")},
}


def canonical_unit(unit: str | None) -> str | None:
    """The UCUM code of the table for `unit` (exact, case-insensitive or a known alias), else None."""
    if not unit:
        return None
    text = unit.strip()
    if text in _UNITS:
        return text
    key = text.replace(" ", "").casefold()
    if key in _ALIASES:
        return _ALIASES[key]
    return _FOLDED.get(key)


def convert(value: float, unit: str | None, target: str, *, system: str = "", code: str = "") -> float | None:
    """`value` in `unit` expressed in `target`, or None when that cannot be done safely.

    `system`/`code` name the analyte (LOINC); they enable the analyte's cross-dimension bridge (e.g. glucose
    mmol/L -> mg/dL). A missing unit never converts: a unitless lab value is ambiguous.
    """
    if unit is None or not unit.strip():
        return None
    src, dst = canonical_unit(unit), canonical_unit(target)
    if src is None or dst is None:  # outside the table: only the identical unit is safe
        same = unit.strip().casefold() == target.strip().casefold()
        return value if same else None
    if src == dst:
        return value
    s, d = _UNITS[src], _UNITS[dst]
    base = value * s.scale
    if s.dimension != d.dimension:
        bridge = _BRIDGES.get((system, code))
        if bridge is None:
            return None
        if (s.dimension, d.dimension) == (bridge.a, bridge.b):
            base = bridge.a_to_b(base)
        elif (s.dimension, d.dimension) == (bridge.b, bridge.a):
            base = bridge.b_to_a(base)
        else:
            return None
    return base / d.scale


def _folded() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _UNITS:
        key = name.casefold()
        if key in out:  # would make case-insensitive lookup ambiguous
            raise AssertionError(f"units {out[key]!r} and {name!r} differ only in case")
        out[key] = name
    return out


_FOLDED: Final = _folded()
