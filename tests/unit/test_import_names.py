"""Our `fhir/` folder must never hide the installed `fhir.resources` package.

The folder is installed as `dicom_fusion.fhir` (setuptools package-dir); with an `__init__.py` in it, any
process started in the repository root (workers, the CLI, pytest) would import it as `fhir` and break
`fhir.resources`. Run in a fresh interpreter from the repository root, which is where it would go wrong.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import fhir.resources.R4B.patient
import dicom_fusion.fhir.client, dicom_fusion.fhir.timeline, dicom_fusion.fhir.report
import dicom_fusion.fhir.codes, dicom_fusion.fhir.errors
import fhir
print(json.dumps({
    "fhir_paths": list(fhir.__path__),
    "patient_model": fhir.resources.R4B.patient.Patient.__name__,
    "ours": dicom_fusion.fhir.client.__file__,
    "loaded": sorted(m for m in sys.modules if m.startswith("dicom_fusion.")),
}))
"""


def test_fhir_folder_has_no_init():
    assert (ROOT / "fhir").is_dir()
    assert not (ROOT / "fhir" / "__init__.py").exists(), (
        "fhir/__init__.py would shadow the installed fhir.resources package; delete it")


def test_fhir_resources_and_our_fhir_import_together_from_repo_root():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["patient_model"] == "Patient"
    assert Path(info["ours"]).resolve() == ROOT / "fhir" / "client.py"
    assert all(Path(p).resolve() != ROOT / "fhir" for p in info["fhir_paths"]), info["fhir_paths"]
    # fhir/ is a library: it must not drag in the service or the model
    assert not [m for m in info["loaded"] if m.startswith(("dicom_fusion.service", "dicom_fusion.inference"))]
