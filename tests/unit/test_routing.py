"""Routing (service/routing): which studies a model reads, which are ignored and why, and the checks a
route table passes before `serve` starts. Studies are real DICOM files: pydicom's MR_small / CT_small
(the slices that got "malignant 0.74" from a radiograph model before routing) and written radiographs."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from conftest import write_instance
from dicom_fusion.inference.card.model import load_card, write_card
from dicom_fusion.inference.synth.generate import generate_patient
from dicom_fusion.service.cli import app
from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.outputs.identity import MANUFACTURER
from dicom_fusion.service.routing.headers import StudyHeader, headers_from_files, headers_from_ledger
from dicom_fusion.service.routing.router import Router
from dicom_fusion.service.routing.routes import RouteError, load_routes
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, Job, JobRoute, JobState, Stage

DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _file(folder: Path, *, study: str, series: str | None = None, modality: str = "DX", sop_class: str = DX_IMAGE,
          **attrs: object) -> Path:
    """One small image of `study` (a new series unless given) with the attributes routes look at."""
    sop = generate_uid()
    path = write_instance(folder / f"{sop}.dcm", study_uid=study, series_uid=series or generate_uid(), sop_uid=sop,
                          rows=16, modality=modality)
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)
    return path


def _study(files: list[Path], **kw: object) -> StudyHeader:
    return headers_from_files(files, **kw)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var")


def _routes(tmp_path: Path, text: str) -> Settings:
    f = tmp_path / "routes.toml"
    f.write_text(text)
    return load_settings(data_dir=tmp_path / "var", routing={"file": f})


# ---- the implicit routes: radiographs to the radiograph model, chest CT to the CT model ------------
def test_default_route_takes_radiographs_and_ignores_mr_and_ct(settings: Settings, tmp_path: Path) -> None:
    table = load_routes(settings)
    assert [r.name for r in table.routes] == ["default", "chest-ct"]
    dx = _file(tmp_path / "dx", study=generate_uid())
    plan = table.decide(_study([dx])).plan
    assert plan is not None and plan.route == "default" and plan.model.startswith(load_card(settings.model_card_path()).name)
    for name in ("MR_small.dcm", "CT_small.dcm"):
        decision = table.decide(_study([Path(get_testdata_file(name))]))
        assert decision.plan is None
        modality = name[:2]
        assert f"({modality}): model" in (decision.ignored or "") and "reads DX, CR" in (decision.ignored or "")
    # pydicom's CT slice is no chest CT volume: no body part, one slice
    ignored = table.decide(_study([Path(get_testdata_file("CT_small.dcm"))])).ignored or ""
    assert "route chest-ct: series 1 (CT): slices 1 not ≥ 16" in ignored


def test_no_routes_configured_sends_chest_ct_to_the_packaged_ct_model(settings: Settings, tmp_path: Path) -> None:
    table = load_routes(settings)
    ct_card = load_card(settings.ct_card_path())  # type: ignore[arg-type]
    assert ct_card.input.modalities == ("CT",) and ct_card.image.spatial_dims == 3
    patient = generate_patient(1, tmp_path / "ct", seed=5, modality="CT")
    ct_files = sorted(Path(patient.study_dir).glob("*.dcm"))
    decision = table.decide(_study(ct_files))
    assert decision.ignored is None and [p.route for p in decision.plans] == ["chest-ct"]
    plan = decision.plans[0]
    assert plan.model == f"{ct_card.name} {ct_card.version}" and plan.card_path == settings.ct_card_path()
    assert plan.series_uids == (dcmread(ct_files[0]).SeriesInstanceUID,)

    dx = _file(tmp_path / "dx", study=generate_uid())
    assert [p.route for p in table.decide(_study([dx])).plans] == ["default"]

    mr = table.decide(_study([Path(get_testdata_file("MR_small.dcm"))]))
    assert mr.plan is None and (mr.ignored or "").startswith("no route matched")
    assert "route default: series 1 (MR): model dfusion-hybrid-demo 0.1.0 reads DX, CR" in (mr.ignored or "")
    assert "route chest-ct: series 1 (MR): Modality MR is not CT" in (mr.ignored or "")

    # a CT series that is not of the chest: ignored, naming the condition that failed
    head_study = generate_uid()
    head = [_file(tmp_path / "head", study=head_study, series="1.2.3.4", modality="CT",
                  sop_class="1.2.840.10008.5.1.4.1.1.2", BodyPartExamined="HEAD", StudyDescription="CT head")
            for _ in range(16)]
    ignored = table.decide(_study(head)).ignored or ""
    assert "route chest-ct: series 1 (CT): none of: BodyPartExamined HEAD is not CHEST; StudyDescription does " \
        "not match /chest|thorax|lung/" in ignored


def test_an_empty_ct_card_setting_leaves_the_default_route_alone(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", model={"ct_card": ""})
    assert settings.ct_card_path() is None
    assert [r.name for r in load_routes(settings).routes] == ["default"]
    missing = load_settings(data_dir=tmp_path / "var", model={"ct_card": str(tmp_path / "nowhere.toml")})
    with pytest.raises(RouteError, match=r"route 'chest-ct': model: cannot load the model card .*nowhere.toml"):
        load_routes(missing)


def test_our_own_outputs_and_non_images_are_never_processed(settings: Settings, tmp_path: Path) -> None:
    table = load_routes(settings)
    study = generate_uid()
    own = _file(tmp_path, study=study, Manufacturer=MANUFACTURER,  # a looped-back Grad-CAM Secondary Capture
                sop_class="1.2.840.10008.5.1.4.1.1.7")
    sr = _file(tmp_path, study=generate_uid(), modality="SR", sop_class=BASIC_TEXT_SR)
    scout = _file(tmp_path, study=generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert "our own output" in (table.decide(_study([own])).ignored or "")
    assert "not an image: structured report" in (table.decide(_study([sr])).ignored or "")
    assert "localizer" in (table.decide(_study([scout])).ignored or "")
    # a radiograph beside our looped-back output: the radiograph series alone is read
    dx_series = generate_uid()
    dx = _file(tmp_path / "mixed", study=study, series=dx_series)
    plan = table.decide(_study([own, dx])).plan
    assert plan is not None and plan.series_uids == (dx_series,)


def test_qc_phantom_is_ignored_without_naming_the_patient(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", routing={"phantom_pattern": "^QC[-^]"})
    table = load_routes(settings)
    from dicom_fusion.service.routing.routes import phantom_pattern

    dx = _file(tmp_path, study=generate_uid(), PatientName="QC^PHANTOM")
    decision = table.decide(headers_from_files([dx], phantom_pattern=phantom_pattern(settings)))
    assert decision.ignored is not None and "QC phantom" in decision.ignored
    assert "PHANTOM" not in decision.ignored


# ---- the route language -------------------------------------------------------------------------
ROUTES = """
[[routes]]
name = "chest"
model = "default"
series = "matching"
[routes.match]
Modality = ["DX", "CR"]
BodyPartExamined = "CHEST"
any = [{ SeriesDescription = "pa|lateral" }, { ProtocolName = "thorax" }]
not = { StationName = "TEST-ROOM" }
PatientAge = { min = 18 }

[[routes]]
name = "peds-chest"
model = "default"
[routes.match]
BodyPartExamined = "CHEST"
PatientAge = { max = 18 }
"""


def test_first_matching_route_wins_with_all_any_not_and_ranges(tmp_path: Path) -> None:
    table = load_routes(_routes(tmp_path, ROUTES))
    study = generate_uid()
    pa = _file(tmp_path / "a", study=study, BodyPartExamined="CHEST", SeriesDescription="Chest PA",
               PatientAge="045Y", StationName="ROOM1")
    lat = _file(tmp_path / "a", study=study, BodyPartExamined="CHEST", SeriesDescription="AP supine",
                PatientAge="045Y", StationName="ROOM1")
    d = table.decide(_study([pa, lat]))
    assert d.plan is not None and d.plan.route == "chest"
    assert d.plan.series_uids == (dcmread(pa).SeriesInstanceUID,)  # series = "matching": the PA series only

    child = _file(tmp_path / "b", study=generate_uid(), BodyPartExamined="CHEST", SeriesDescription="PA",
                  PatientAge="006Y")
    d = table.decide(_study([child]))
    assert d.plan is not None and d.plan.route == "peds-chest"

    test_room = _file(tmp_path / "c", study=generate_uid(), BodyPartExamined="CHEST", SeriesDescription="PA",
                      PatientAge="045Y", StationName="test-room")
    _, verdicts = table.explain(_study([test_room]))
    assert not verdicts[0].matched and "not (StationName) matched" in verdicts[0].why
    assert not verdicts[1].matched and "PatientAge 45 not ≤ 18" in verdicts[1].why

    knee = _file(tmp_path / "d", study=generate_uid(), BodyPartExamined="KNEE", PatientAge="045Y")
    d = table.decide(_study([knee]))
    assert d.ignored is not None and d.ignored.startswith("no route matched")
    assert "BodyPartExamined KNEE is not CHEST" in d.ignored


def test_largest_series_is_chosen_by_slices(tmp_path: Path) -> None:
    table = load_routes(_routes(tmp_path, '[[routes]]\nname = "x"\nseries = "largest"\n'))
    study, big = generate_uid(), generate_uid()
    files = [_file(tmp_path, study=study)] + [_file(tmp_path, study=study, series=big) for _ in range(3)]
    d = table.decide(_study(files))
    assert d.plan is not None and d.plan.series_uids == (big,)


def test_a_pathological_regex_is_cut_short_by_the_timeout(tmp_path: Path) -> None:
    settings = _routes(tmp_path, '[[routes]]\nname = "slow"\n[routes.match]\nSeriesDescription = "(a|aa)+$"\n')
    settings = load_settings(data_dir=tmp_path / "var", routing={"file": settings.routing.file,
                                                                  "regex_timeout_ms": 20})
    table = load_routes(settings)
    dx = _file(tmp_path, study=generate_uid(), SeriesDescription="a" * 40 + "!")
    d = table.decide(_study([dx]))
    assert d.ignored is not None and "timed out" in d.ignored


# ---- validation at load -------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ('[[routes]]\nname = "a"\n[routes.match]\nModalty = "CT"\n', "route 'a': match.Modalty: unknown attribute"),
    ('[[routes]]\nname = "a"\n[routes.match]\nSeriesDescription = "(unclosed"\n',
     "route 'a': match.SeriesDescription: invalid regular expression"),
    ('[[routes]]\nname = "a"\nmodel = "nowhere/card.toml"\n', "route 'a': model: cannot load the model card"),
    ('[[routes]]\nname = "a"\n[[routes]]\nname = "a"\n', "route 'a': name: used by an earlier route"),
    ('[[routes]]\nname = "a"\nseries = "biggest"\n', "route 'a': series: 'biggest' is unknown"),
    ('[[routes]]\nname = "a"\npriorty = 1\nmodle = "x"\n', "route 'a': unknown key(s) modle, priorty"),
    ('[[routes]]\nname = "a"\n[routes.match]\nPatientAge = { min = 60, max = 18 }\n', "min 60 is above max 18"),
    ('[[routes]]\nmodel = "default"\n', "route #1: name: every route needs a name"),
])
def test_invalid_routes_are_refused_naming_file_route_and_field(tmp_path: Path, text: str, message: str) -> None:
    settings = _routes(tmp_path, text)
    with pytest.raises(RouteError) as err:
        load_routes(settings)
    assert str(settings.routing.file) in str(err.value) and message in str(err.value)


def test_a_route_card_that_is_invalid_is_refused(tmp_path: Path) -> None:
    card_dir = tmp_path / "ct-model"
    card_dir.mkdir()
    card = load_card(load_settings(data_dir=tmp_path / "var").model_card_path())
    shutil.copy(card.weights, card_dir / card.weights.name)
    card = dataclasses.replace(card, weights=card_dir / card.weights.name, path=card_dir / "card.toml")
    write_card(card, card_dir / "card.toml")
    assert load_routes(_routes(tmp_path, '[[routes]]\nname = "ct"\nmodel = "ct-model/card.toml"\n')).routes
    (card_dir / card.weights.name).write_bytes(b"not the weights")  # checksum no longer matches
    settings = _routes(tmp_path, '[[routes]]\nname = "ct"\nmodel = "ct-model/card.toml"\n')
    with pytest.raises(RouteError, match=r"route 'ct': model: cannot load the model card .*ct-model/card.toml"):
        load_routes(settings)


def test_routes_check_and_explain_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = tmp_path / "df.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "var"}"\n' + ROUTES)
    res = runner.invoke(app, ["routes", "check", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "chest" in res.output and "peds-chest" in res.output and "2 route(s) valid" in res.output

    res = runner.invoke(app, ["routes", "explain", get_testdata_file("MR_small.dcm"), "--config", str(cfg)])
    assert res.exit_code == 1 and "→ ignored" in res.output and "route chest" in res.output
    assert "Wang" not in res.output  # MR_small's patient name is never printed

    folder = tmp_path / "pa"
    _file(folder, study=generate_uid(), BodyPartExamined="CHEST", SeriesDescription="PA", PatientAge="050Y")
    res = runner.invoke(app, ["routes", "explain", str(folder), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "→ job on route chest" in res.output

    bad = tmp_path / "bad.toml"
    bad.write_text(f'data_dir = "{tmp_path / "var"}"\n[[routes]]\nname = "x"\n[routes.match]\nFoo = 1\n')
    res = runner.invoke(app, ["routes", "check", "--config", str(bad)])
    assert res.exit_code == 1 and "match.Foo: unknown attribute" in res.output


# ---- the router on the ledger: ignored is a terminal state with a reason, not a failure ------------
def _store(ledger: Ledger, path: Path, calling_ae: str = "MODALITY") -> None:
    ds = dcmread(path, stop_before_pixels=True)
    ledger.record_instances([InstanceRecord(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID, modality=ds.Modality, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        path=path, sha256="0" * 64, size=path.stat().st_size, calling_ae=calling_ae)])


def test_router_records_ignored_jobs_and_routes_the_rest(settings: Settings, tmp_path: Path) -> None:
    from dicom_fusion.service.storage.schema import upgrade

    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    router = Router.from_settings(settings, ledger)
    mr = tmp_path / "mr.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), mr)
    dx_study = generate_uid()
    dx = _file(tmp_path / "dx", study=dx_study)
    _store(ledger, mr)
    _store(ledger, dx)
    created = ledger.complete_studies(quiet_before=None, study_uids=[dcmread(mr).StudyInstanceUID, dx_study],
                                      route=router)
    assert len(created) == 1
    with ledger.session() as s:
        jobs = {j.id: j for j in s.query(Job)}
    ran = jobs[created[0]]
    assert ran.state == JobState.COMPLETE and ran.route == "default" and ran.card_path
    ignored = [j for j in jobs.values() if j.id != ran.id]
    assert len(ignored) == 1 and ignored[0].state == JobState.IGNORED and ignored[0].finished_at is not None
    assert "reads DX, CR" in (ignored[0].error or "")
    header = headers_from_ledger(ledger, ran.study_id)
    assert header is not None and header.calling_ae == "MODALITY"
    ledger.close()


def test_a_study_reopened_by_our_looped_back_output_gets_no_second_job(settings: Settings, tmp_path: Path) -> None:
    from dicom_fusion.service.ops.operations import make_router
    from dicom_fusion.service.storage.schema import upgrade

    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    router = Router.from_settings(settings, ledger)
    study = generate_uid()
    _store(ledger, _file(tmp_path / "dx", study=study))
    assert len(ledger.complete_studies(quiet_before=None, study_uids=[study], route=router)) == 1
    # our SR comes back through the PACS's auto-routing: the study reopens, completes, and is ignored
    _store(ledger, _file(tmp_path / "loop", study=study, modality="SR", sop_class=BASIC_TEXT_SR,
                         Manufacturer=MANUFACTURER))
    assert ledger.complete_studies(quiet_before=None, study_uids=[study], route=router) == []
    v2 = ledger.jobs_for_study(study)[-1]
    assert v2.version == 2 and v2.state == JobState.IGNORED
    assert "nothing new for route default" in (v2.error or "") and "since job v1" in (v2.error or "")
    # a new radiograph of the same study is read again
    _store(ledger, _file(tmp_path / "dx2", study=study))
    assert len(ledger.complete_studies(quiet_before=None, study_uids=[study], route=router)) == 1
    # an operator replay always runs
    ledger.close()
    ledger = Ledger(settings.ledger_url)
    with ledger.transaction() as s:
        for j in s.query(Job):
            j.state = JobState.DONE if j.state != JobState.IGNORED else j.state
    job_ids = ledger.add_job_version(study, reason="operator replay", route=make_router(ledger, settings))
    assert job_ids is not None and len(job_ids) == 1
    assert ledger.job(job_ids[0]).state == JobState.COMPLETE  # type: ignore[union-attr]
    ledger.close()


def test_a_job_reads_only_the_series_its_route_selected(settings: Settings, tmp_path: Path) -> None:
    from dicom_fusion.service.storage.schema import upgrade

    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    study, chosen = generate_uid(), generate_uid()
    files = [_file(tmp_path, study=study, series=chosen), _file(tmp_path, study=study)]
    for f in files:
        _store(ledger, f)
    [job_id] = ledger.complete_studies(quiet_before=None, study_uids=[study], route=lambda _id: JobRoute(
        route="x", card_path="", model="m 1", series_uids=(chosen,)))
    job = ledger.claim(job_id, stage=Stage.PREPARE, owner="t", lease_seconds=60)
    assert job is not None and job.series_uids == (chosen,)
    assert ledger.study_files(job.study_id, job.series_uids) == [files[0]]
    assert ledger.study_files(job.study_id) == files
    ledger.close()


# ---- several models per study: `continue` ---------------------------------------------------------
def _second_card(folder: Path, name: str = "dfusion-second-opinion") -> Path:
    """A second model card: the shipped weights under another model name (another model to the service)."""
    card = load_card(load_settings(data_dir=folder / "var").model_card_path())
    folder.mkdir(parents=True, exist_ok=True)
    card = dataclasses.replace(card, name=name, path=folder / "card.toml")
    write_card(card, folder / "card.toml")
    return folder / "card.toml"


def _two_model_routes(tmp_path: Path, *, second_model: str | None = None, then: str = "") -> Settings:
    second = second_model or str(_second_card(tmp_path / "second"))
    return _routes(tmp_path, f"""
[[routes]]
name = "xr-primary"
model = "default"
continue = true
[routes.match]
Modality = ["DX", "CR"]

[[routes]]
name = "xr-second"
model = "{second}"
series = "all"
release = "review"
[routes.match]
Modality = "DX"

[[routes]]
name = "after-the-stop"
model = "default"
{then}""")


def test_continue_gives_one_plan_per_matching_route_up_to_the_first_stop(tmp_path: Path) -> None:
    table = load_routes(_two_model_routes(tmp_path))
    assert [r.continues for r in table.routes] == [True, False, False]
    series = generate_uid()
    dx = _file(tmp_path / "dx", study=generate_uid(), series=series)
    d = table.decide(_study([dx]))
    assert d.ignored is None and d.plan == d.plans[0]
    assert [(p.route, p.model.split()[0], p.series_uids, p.release) for p in d.plans] == [
        ("xr-primary", "dfusion-hybrid-demo", (series,), None),
        ("xr-second", "dfusion-second-opinion", (series,), "review")]  # not "after-the-stop": xr-second stops
    assert d.plans[0].card_path != d.plans[1].card_path
    # a CR study: the continuing route matches, the second does not (DX only), the third takes it
    cr = _file(tmp_path / "cr", study=generate_uid(), modality="CR")
    assert [p.route for p in table.decide(_study([cr])).plans] == ["xr-primary", "after-the-stop"]
    # nothing matches: one reason naming every route
    mr = table.decide(_study([Path(get_testdata_file("MR_small.dcm"))]))
    assert mr.plans == () and mr.ignored is not None
    assert all(f"route {n}:" in mr.ignored for n in ("xr-primary", "xr-second", "after-the-stop"))


def test_continue_must_be_true_or_false(tmp_path: Path) -> None:
    settings = _routes(tmp_path, '[[routes]]\nname = "a"\ncontinue = "yes"\n')
    with pytest.raises(RouteError, match=r"route 'a': continue: expected true or false, got 'yes'"):
        load_routes(settings)


def _stored_dx(ledger: Ledger, folder: Path) -> str:
    study = generate_uid()
    _store(ledger, _file(folder, study=study))
    return study


def test_a_study_on_two_routes_gets_two_distinct_jobs_exactly_once(tmp_path: Path) -> None:
    from dicom_fusion.service.outputs.identity import derive_sr_uids
    from dicom_fusion.service.storage.schema import upgrade

    settings = _two_model_routes(tmp_path)
    upgrade(settings.ledger_url)
    ledger, other = Ledger(settings.ledger_url), Ledger(settings.ledger_url)  # two listeners' ledgers
    router = Router.from_settings(settings, ledger)
    study = _stored_dx(ledger, tmp_path / "dx")
    # The second listener completes the study while the first is still routing it (outside any
    # transaction): the first one's conditional UPDATE then finds nothing to do.
    raced: list[int] = []

    def first_router(study_id: int):  # type: ignore[no-untyped-def]
        raced.extend(other.complete_studies(quiet_before=None, study_uids=[study], route=router))
        return router(study_id)

    assert ledger.complete_studies(quiet_before=None, study_uids=[study], route=first_router) == []
    assert len(raced) == 2
    jobs = ledger.jobs_for_study(study)
    assert [(j.id, j.version, j.route, j.state) for j in jobs] == [
        (raced[0], 1, "xr-primary", JobState.COMPLETE), (raced[1], 2, "xr-second", JobState.COMPLETE)]
    assert jobs[0].card_path != jobs[1].card_path and jobs[1].model.startswith("dfusion-second-opinion")
    assert [j.release for j in jobs] == ["auto", "review"]
    assert jobs[0].created_at == jobs[1].created_at  # one completion
    assert [j.id for j in ledger.current_jobs(study)] == raced
    with ledger.session() as s:
        from dicom_fusion.service.storage.models import Study

        assert s.query(Study).filter_by(study_uid=study).one().job_version == 2
    # each job derives its own SR (and so its own DiagnosticReport, identified by the SR UID)
    srs = {derive_sr_uids(study, j.model.split()[0], j.model.split()[1], j.version)[1] for j in jobs}
    assert len(srs) == 2
    # a claim hands each job its own card and series
    refs = [ledger.claim(j.id, stage=Stage.PREPARE, owner="t", lease_seconds=60) for j in jobs]
    assert [r.card_path for r in refs if r] == [j.card_path for j in jobs]
    ledger.close()
    other.close()


def test_two_routes_on_one_model_still_get_distinct_versions_and_sr_uids(tmp_path: Path) -> None:
    from dicom_fusion.service.outputs.identity import derive_sr_uids
    from dicom_fusion.service.storage.schema import upgrade

    settings = _two_model_routes(tmp_path, second_model="default")
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    study = _stored_dx(ledger, tmp_path / "dx")
    assert len(ledger.complete_studies(quiet_before=None, study_uids=[study],
                                       route=Router.from_settings(settings, ledger))) == 2
    jobs = ledger.jobs_for_study(study)
    assert jobs[0].model == jobs[1].model and [j.version for j in jobs] == [1, 2]
    name, version = jobs[0].model.split()
    assert derive_sr_uids(study, name, version, 1) != derive_sr_uids(study, name, version, 2)
    ledger.close()


def test_reopen_replay_and_read_models_with_two_jobs_per_completion(tmp_path: Path) -> None:
    from opshelpers import OWNER, run_to_done

    from dicom_fusion.service.ops import monitoring, operations
    from dicom_fusion.service.storage.schema import upgrade

    settings = _two_model_routes(tmp_path)
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    router = Router.from_settings(settings, ledger)
    study = _stored_dx(ledger, tmp_path / "dx")
    first, second = ledger.complete_studies(quiet_before=None, study_uids=[study], route=router)

    def shown() -> tuple[str, str, list[str]]:
        row = monitoring.list_studies(ledger).items[0]
        assert monitoring.study_detail(ledger, study).state == row.state
        return row.state, row.route, [m.split()[0] for m in row.model.split(", ") if m]

    assert shown() == ("complete", "xr-primary, xr-second", ["dfusion-hybrid-demo", "dfusion-second-opinion"])
    run_to_done(ledger, second)  # the newest job done, the other not started: the study is not done
    assert shown()[0] == "complete"
    ledger.mark_enqueued(first, stage=Stage.PREPARE, lease_seconds=60)
    assert ledger.claim(first, stage=Stage.PREPARE, owner=OWNER, lease_seconds=60) is not None
    assert shown()[0] == "preparing"
    assert ledger.fail(first, owner=OWNER, reason="prepare: boom", retry_in=None, lease_seconds=60) == "dead"
    assert shown()[0] == "dead"  # any dead job makes the study dead; it is counted once
    counts = monitoring.studies_by_state(ledger)
    assert counts["dead"] == 1 and counts["done"] == 0 and sum(counts.values()) == 1
    assert monitoring.list_studies(ledger, state="dead").items[0].error == "prepare: boom"

    # retry picks the dead job of the completion, not the newest version (done); then the study is done
    calls: list[tuple[int, Stage, bool]] = []
    result = operations.retry_study(ledger, lambda j, st, rq: calls.append((j, st, rq)), study)
    assert calls == [(first, Stage.PREPARE, True)] and result.job_version == 1
    ledger.mark_enqueued(first, stage=Stage.PREPARE, lease_seconds=60)
    run_to_done(ledger, first)
    assert shown()[0] == "done"

    # our SR looped back: one ignored job naming both routes, no result twice
    _store(ledger, _file(tmp_path / "loop", study=study, modality="SR", sop_class=BASIC_TEXT_SR,
                         Manufacturer=MANUFACTURER))
    assert ledger.complete_studies(quiet_before=None, study_uids=[study], route=router) == []
    v3 = ledger.jobs_for_study(study)[-1]
    assert v3.version == 3 and v3.state == JobState.IGNORED
    assert "nothing new for route xr-primary" in (v3.error or "") and "nothing new for route xr-second" in (v3.error or "")
    assert shown() == ("ignored", "", [])
    assert [j.id for j in ledger.current_jobs(study)] == [v3.id]

    # an operator replay routes again and creates the jobs of both routes
    calls.clear()
    result = operations.replay_study(ledger, lambda j, st, rq: calls.append((j, st, rq)), study,
                                     route=operations.make_router(ledger, settings))
    jobs = ledger.jobs_for_study(study)
    assert [(j.version, j.route) for j in jobs[3:]] == [(4, "xr-primary"), (5, "xr-second")]
    assert calls == [(jobs[3].id, Stage.PREPARE, False), (jobs[4].id, Stage.PREPARE, False)]
    assert result.job_version == 4 and "v4 (route xr-primary), v5 (route xr-second)" in result.message
    assert shown()[0] == "complete"  # neither has been marked queued by this fake enqueue
    ledger.close()


def test_explain_prints_every_job_the_table_would_create(tmp_path: Path) -> None:
    settings = _two_model_routes(tmp_path)
    cfg = tmp_path / "df.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "var"}"\n[routing]\nfile = "{settings.routing.file}"\n')
    folder = tmp_path / "dx"
    _file(folder, study=generate_uid())
    res = CliRunner().invoke(app, ["routes", "explain", str(folder), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "→ job on route xr-primary" in res.output and "→ job on route xr-second" in res.output
    assert "model dfusion-second-opinion" in res.output and "release review" in res.output
    assert "→ job on route after-the-stop" not in res.output and "2 jobs" in res.output
    res = CliRunner().invoke(app, ["routes", "check", "--config", str(cfg)])
    assert res.exit_code == 0 and "continue" in res.output, res.output


# ---- reload without restart (service/routing/reload.py; the serve process: tests/integration) ------
def _aged(path: Path, text: str) -> None:
    """Write `text` and date the file 5 s back, as a file saved a while ago (past the settle time)."""
    import os
    import time

    path.write_text(text)
    os.utime(path, (time.time() - 5, time.time() - 5))


def test_live_router_swaps_a_valid_table_and_keeps_the_old_one_otherwise(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import logging

    from dicom_fusion.service.routing.reload import STATUS_FILE, LiveRouter, read_status
    from dicom_fusion.service.storage.schema import upgrade

    settings = _routes(tmp_path, '[[routes]]\nname = "first"\n')
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    live = LiveRouter(settings, ledger, status_path=tmp_path / STATUS_FILE, check_seconds=0)
    study = _stored_dx(ledger, tmp_path / "dx")
    with ledger.session() as s:
        from dicom_fusion.service.storage.models import Study

        sid = s.query(Study).filter_by(study_uid=study).one().id
    assert live.refresh() is None  # unchanged file: nothing to do
    assert [j.route for j in live(sid)] == ["first"]  # type: ignore[union-attr]

    file = settings.routing.file
    assert file is not None
    file.write_text('[[routes]]\nname = "second"\n')  # just saved: may be half written, looked at later
    assert live.refresh() is None and live.routes == ["first"]
    _aged(file, '[[routes]]\nname = "second"\n')
    assert live.refresh() is True and [j.route for j in live(sid)] == ["second"]  # type: ignore[union-attr]

    caplog.set_level(logging.ERROR, logger="dicom_fusion.service.routing.reload")
    _aged(file, '[[routes]]\nname = "third"\n[routes.match]\nSeriesDescription = "(unclosed"\n')
    assert live.refresh() is False and live.routes == ["second"]
    assert [j.route for j in live(sid)] == ["second"]  # type: ignore[union-attr]
    status = read_status(tmp_path)
    assert status is not None and status.routes == ("second",) and status.attempts == 2
    assert status.error is not None and "route 'third': match.SeriesDescription: invalid regular" in status.error
    live.request()  # SIGHUP on the unchanged bad file: refused again, not logged again
    assert live.refresh() is False
    assert len([r for r in caplog.records if "not reloaded" in r.getMessage()]) == 1
    assert read_status(tmp_path).attempts == 3  # type: ignore[union-attr]

    file.unlink()  # a missing file is an invalid table too
    assert live.refresh() is False and live.routes == ["second"] and "cannot read" in (live.error or "")
    _aged(file, '[[routes]]\nname = "fourth"\ncontinue = true\n[[routes]]\nname = "fifth"\n')
    assert live.refresh() is True and live.error is None
    raw = json.loads((tmp_path / STATUS_FILE).read_text())
    assert [(r["name"], r["continue"]) for r in raw["routes"]] == [("fourth", True), ("fifth", False)]
    assert raw["error"] is None and raw["source"] == str(file)
    ledger.close()


def test_live_router_reloads_the_routes_of_the_configuration_file(tmp_path: Path) -> None:
    from dicom_fusion.service.routing.reload import LiveRouter
    from dicom_fusion.service.storage.schema import upgrade

    cfg = tmp_path / "df.toml"
    head = f'data_dir = "{tmp_path / "var"}"\n'
    _aged(cfg, head + '[[routes]]\nname = "a"\n')
    settings = load_settings(cfg)
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    live = LiveRouter(settings, ledger, config=cfg, check_seconds=0)
    assert live.watched == cfg and live.routes == ["a"]
    _aged(cfg, head + '[[routes]]\nname = "b"\n')
    assert live.refresh() is True and live.routes == ["b"]
    _aged(cfg, head + 'listener = 3\n[[routes]]\nname = "c"\n')  # the configuration itself is invalid
    assert live.refresh() is False and live.routes == ["b"] and "invalid configuration" in (live.error or "")
    ledger.close()
