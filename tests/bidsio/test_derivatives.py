"""Output names, writers and their content."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cadiff import __version__
from bids_cadiff.bidsio import derivatives as d
from bids_cadiff.labels import SYNTHSEG32, Label, LabelTable

OPTIONAL = {"session": "ses", "acquisition": "acq", "reconstruction": "rec", "run": "run"}
VALUES = {"session": "2", "acquisition": "mprage", "reconstruction": "norm", "run": "01"}


@pytest.mark.parametrize(
    "keys",
    [c for n in range(len(OPTIONAL) + 1) for c in itertools.combinations(OPTIONAL, n)],
)
def test_names_for_every_entity_combination(keys):
    ents = {"subject": "01", **{k: VALUES[k] for k in keys}}
    prefix = "_".join(["sub-01"] + [f"{OPTIONAL[k]}-{VALUES[k]}" for k in OPTIONAL if k in keys])
    folder = Path("/o/sub-01") / ("ses-2" if "session" in keys else "") / "anat"
    assert d.dseg_path("/o", ents) == folder / f"{prefix}_desc-cadiff_dseg.nii.gz"
    assert d.dseg_sidecar_path("/o", ents) == folder / f"{prefix}_desc-cadiff_dseg.json"
    assert d.volumes_path("/o", ents) == folder / f"{prefix}_desc-cadiff_volumes.tsv"
    assert d.figure_path("/o", ents) == Path("/o/sub-01/figures") / f"{prefix}_desc-cadiff_dseg.png"
    assert d.entities_from_name(d.volumes_path("/o", ents).name) == ents


def test_prefixed_labels_and_bad_labels():
    assert d.dseg_path("/o", {"subject": "sub-01", "session": "ses-a"}).name == \
        "sub-01_ses-a_desc-cadiff_dseg.nii.gz"
    with pytest.raises(ValueError, match="subject"):
        d.dseg_path("/o", {"session": "1"})
    with pytest.raises(ValueError, match="alphanumeric"):
        d.dseg_path("/o", {"subject": "0_1"})


def test_group_paths():
    assert d.group_volumes_path("/o") == Path("/o/group/desc-cadiff_volumes.tsv")
    assert d.group_volumes_sidecar_path("/o") == Path("/o/group/desc-cadiff_volumes.json")


def test_dataset_description_content(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text('{"Name": "ds000001"}')
    path = d.write_dataset_description(tmp_path / "out", raw, env={})
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == "1.10.0"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "bids_cadiff" and gen["Version"] == __version__ and gen["CodeURL"]
    assert desc["DatasetLinks"]["raw"] == raw.absolute().as_uri()
    assert desc["SourceDatasets"] == [{"URL": raw.absolute().as_uri()}]
    assert "ds000001" in desc["Name"]


def test_container_detection(monkeypatch):
    monkeypatch.setattr(d.Path, "exists", lambda self: False)
    assert d.container_info({}) is None
    assert d.container_info({"APPTAINER_CONTAINER": "/img.sif"}) == {
        "Type": "singularity", "Tag": "/img.sif"}
    assert d.container_info({"SINGULARITY_CONTAINER": "/a.sif", "CADIFF_CONTAINER_TAG": "t:1"}) \
        == {"Type": "singularity", "Tag": "t:1"}
    monkeypatch.setattr(d.Path, "exists", lambda self: str(self) == "/.dockerenv")
    assert d.container_info({"CADIFF_CONTAINER_TAG": "org/cadiff:1"}) == {
        "Type": "docker", "Tag": "org/cadiff:1"}
    desc = d.dataset_description("/raw", env={"CADIFF_CONTAINER_TAG": "org/cadiff:1"})
    assert desc["GeneratedBy"][0]["Container"]["Type"] == "docker"
    # podman runs the same OCI image: it sets container=podman and makes /run/.containerenv
    monkeypatch.setattr(d.Path, "exists", lambda self: False)
    assert d.container_info({"container": "podman", "CADIFF_CONTAINER_TAG": "t:2"}) == {
        "Type": "docker", "Tag": "t:2"}
    monkeypatch.setattr(d.Path, "exists", lambda self: str(self) == "/run/.containerenv")
    assert d.container_info({})["Type"] == "docker"


def test_dseg_tsv(tmp_path):
    path = d.write_dseg_tsv(tmp_path, SYNTHSEG32)
    assert path.name == "desc-cadiff_dseg.tsv"
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["index", "name", "abbreviation", "color", "mapping"]
    assert len(lines) == len(SYNTHSEG32) + 1
    rows = {ln.split("\t")[0]: ln.split("\t") for ln in lines[1:]}
    assert rows["17"] == ["17", "Left-Hippocampus", "L-HI", "#dcd814", "9"]  # SGM
    assert rows["3"][4] == "8" and rows["2"][4] == "2" and rows["24"][4] == "3"
    assert d.read_dseg_tsv(tmp_path) == SYNTHSEG32


def test_every_builtin_bids_label_is_a_common_label():
    assert {e.bids_label for e in SYNTHSEG32.entries} <= set(d.BIDS_COMMON_LABELS)


def test_dseg_tsv_rejects_unknown_common_label(tmp_path):
    table = LabelTable((Label(0, "bg", "BG", "#000000", "BG"), Label(1, "x", "X", "#010101", "Th")))
    with pytest.raises(ValueError, match="not a BIDS common label"):
        d.write_dseg_tsv(tmp_path, table)
    assert not list(tmp_path.iterdir())


def test_bidsignore_keeps_existing_lines(tmp_path):
    (tmp_path / ".bidsignore").write_text("mine/\n")
    text = d.write_bidsignore(tmp_path).read_text()
    assert text.splitlines()[0] == "mine/" and "/group" in text
    assert d.write_bidsignore(tmp_path).read_text() == text  # idempotent


def test_sidecar_content(tmp_path):
    fields = d.dseg_sidecar(
        sources=["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"], model_name="cadiff-synthseg32",
        model_version="1.0", model_sha256="ab" * 32, steps=5, seed=3, device="cpu",
        run_time_s=12.3456, atlas="MNI152NLin2009cAsym", registration={"MI": 0.5},
    )
    path = d.write_dseg_sidecar(d.dseg_sidecar_path(tmp_path, {"subject": "01"}), fields)
    data = json.loads(path.read_text())
    assert data["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz"]
    assert data["Model"]["SHA256"] == "ab" * 32 and data["SamplingSteps"] == 5
    assert data["RandomSeed"] == 3 and data["RunTimeSeconds"] == 12.346
    assert data["Atlas"] == "MNI152NLin2009cAsym" and data["Registration"] == {"MI": 0.5}
    assert set(data["Software"]) >= {"python", "torch", "monai", "antspyx", "nibabel", "pybids",
                                     "numpy"}
    with pytest.raises(ValueError, match="BIDS URI"):
        d.dseg_sidecar(sources=["/abs/path.nii.gz"], model_name="m", model_version="1",
                       model_sha256="x", steps=1, seed=0, device="cpu", run_time_s=0)


def test_save_label_map_keeps_geometry(tmp_path, make_nifti):
    src = make_nifti()
    src.set_qform(src.affine, code=2)
    labels = np.zeros(src.shape, dtype=np.int64)
    labels[2:4, 3:6, 4:8] = 53
    out = d.save_label_map(tmp_path / "sub-01_desc-cadiff_dseg.nii.gz", labels, src.affine,
                           src.header)
    img = nib.load(out)
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(img.dataobj), labels)
    assert np.allclose(img.affine, src.affine)
    assert int(img.header["qform_code"]) == 2 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_save_label_map_int16_and_errors(tmp_path):
    big = np.full((3, 4, 5), 2035)
    path = d.save_label_map(tmp_path / "a.nii.gz", big, np.eye(4))
    assert nib.load(path).get_data_dtype() == np.int16
    with pytest.raises(ValueError, match="3-D"):
        d.save_label_map(tmp_path / "b.nii.gz", np.zeros((3, 4)), np.eye(4))
    with pytest.raises(ValueError, match="integers"):
        d.save_label_map(tmp_path / "b.nii.gz", np.full((2, 2, 2), 0.5), np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_save_label_map_failure_leaves_nothing(tmp_path, monkeypatch):
    def fail(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        d.save_label_map(tmp_path / "x_dseg.nii.gz", np.zeros((3, 3, 3), int), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_compute_volumes():
    lab = np.zeros((9, 10, 11), dtype=np.int16)
    lab[0:2] = 2       # L-WM: 2*10*11 = 220 voxels
    lab[2, 0:5] = 17   # L-HI: 55
    lab[3, 0] = 24     # CSF: 11 (not in TotalBrain)
    lab[4, 0] = 4      # L-LV: 11 (not in TotalBrain)
    lab[5, 0, 0] = 999  # unknown value: ignored
    vols = d.compute_volumes(lab, 0.5, SYNTHSEG32)
    assert list(vols)[0] == "L-WM" and list(vols)[-1] == "TotalBrain"
    assert "BG" not in vols and len(vols) == len(SYNTHSEG32)
    assert vols["L-WM"] == 110.0 and vols["L-HI"] == 27.5 and vols["CSF"] == 5.5
    assert vols["R-HI"] == 0.0
    assert vols["TotalBrain"] == 137.5
    with pytest.raises(ValueError):
        d.compute_volumes(lab, 0.0, SYNTHSEG32)


def test_volumes_tsv(tmp_path):
    ents = {"subject": "01", "session": "2", "run": "1"}
    vols = {"L-HI": 27.5, "TotalBrain": 137.0}
    path = d.write_volumes_tsv(d.volumes_path(tmp_path, ents), vols)
    header, row = path.read_text().splitlines()
    assert header.split("\t") == ["participant_id", "session_id", "run", "L-HI", "TotalBrain"]
    assert row.split("\t") == ["sub-01", "ses-2", "1", "27.500", "137.000"]
    assert d.find_volume_tables(tmp_path) == [path]


def test_doctests():
    """The path doctests of derivatives (and of the other I/O modules) hold."""
    import doctest

    from bids_cadiff import config
    from bids_cadiff.bidsio import query
    from bids_cadiff.io import atomic

    for module in (d, query, config, atomic):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        assert result.attempted > 0, module.__name__
