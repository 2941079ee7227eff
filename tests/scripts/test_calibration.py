"""scripts/calibration.py: ECE, the temperature chosen on training subjects, the summary."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.scripts import load_script

calibration = load_script("calibration")

SHAPE = (14, 14, 14)


def _run(path: Path, seed: int, sharpen: float, ncc: float) -> None:
    """A fake calibration run: the reference is drawn from true probabilities q, the stored
    probabilities are q sharpened (q^sharpen): overconfident by a temperature of ``sharpen``."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(SHAPE))
    logits = rng.normal(size=(n, 3)) * 2
    logits[:, 1] += 1.0
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.array([rng.choice(3, p=row) for row in q], dtype=np.int16)
    p = q**sharpen
    p /= p.sum(1, keepdims=True)
    np.savez_compressed(
        path, index=np.arange(n), shape=np.array(SHAPE), probabilities=np.rint(p * 255).astype(np.uint8),
        truth=truth, zooms=np.ones(3), registration_ncc=ncc, brain_only=False, model_sha256="x")


def test_ece_is_zero_for_calibrated_and_positive_for_overconfident_voxels():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1, 200_000)
    calibrated = rng.uniform(size=conf.size) < conf
    assert calibration._ece(*calibration._bins(conf, calibrated)) < 0.01
    over = rng.uniform(size=conf.size) < conf - 0.2
    assert calibration._ece(*calibration._bins(conf, over)) == pytest.approx(0.2, abs=0.02)


def test_summarise_fits_the_temperature_on_training_subjects_and_reports_test_figures(tmp_path):
    runs = tmp_path / "fold1"
    runs.mkdir()
    for k, ncc in enumerate((0.55, 0.5, 0.6, 0.45)):
        _run(runs / f"sub-0{k + 1}.npz", k, sharpen=2.0, ncc=ncc)
    regs = pd.DataFrame([{"subject": f"sub-0{k + 1}", "image": "T1.mgz", "brain_only": False,
                          "ncc": ncc, "ncc_shift8mm": ncc - 0.25}
                         for k, ncc in enumerate((0.55, 0.5, 0.6, 0.45))])
    regs.to_csv(tmp_path / "reg.tsv", sep="\t", index=False)
    figure = tmp_path / "rel.png"
    assert calibration.main(["summarise", "--registrations", str(tmp_path / "reg.tsv"),
                             "--fold", str(runs), "sub-01", "--out-dir", str(tmp_path / "out"),
                             "--figure", str(figure)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (fold,) = summary["folds"]
    assert fold["train"] == ["sub-02", "sub-03", "sub-04"] and fold["test"] == ["sub-01"]
    assert fold["temperature_fitted"] == pytest.approx(2.0, rel=0.15)
    assert fold["temperature_kept"]
    assert summary["ece_chosen"] < summary["ece_raw"] / 2
    # halfway between the worst good training NCC (0.45) and the best shifted one (0.35)
    assert fold["registration_min"]["with_skull"] == pytest.approx(0.40)
    assert summary["registration_check"] == {"shift_mm": 8.0, "good_flagged": 0,
                                             "shifted_caught": 1, "test_images": 1}
    rows = pd.read_csv(tmp_path / "out" / "calibration.tsv", sep="\t")
    assert rows.subject.tolist() == ["sub-01"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_trained_on_every_subject_gets_choices_made_on_out_of_fold_runs(tmp_path):
    """Two folds; every subject is a test subject of one. The out-of-fold choices use each
    subject's run by the fold model that did not train on it (here overconfident by 2, while
    the runs on training subjects are calibrated), and `store --fold out-of-fold` writes that
    temperature into a model trained on all of them."""
    from bids_cadiff.inference.checkpoint import load_checkpoint
    from tests.conftest import save_tiny_model

    nccs = {"sub-01": 0.55, "sub-02": 0.5, "sub-03": 0.6, "sub-04": 0.45}
    shifted = {"sub-01": 0.2, "sub-02": 0.1, "sub-03": 0.3, "sub-04": 0.05}
    tests = {"fold1": ["sub-01", "sub-02"], "fold2": ["sub-03", "sub-04"]}
    for fold, test in tests.items():
        (tmp_path / fold).mkdir()
        for k, (subject, ncc) in enumerate(nccs.items()):
            _run(tmp_path / fold / f"{subject}.npz", k, sharpen=2.0 if subject in test else 1.0,
                 ncc=ncc)
    pd.DataFrame([{"subject": s, "image": "T1.mgz", "brain_only": False, "ncc": ncc,
                   "ncc_shift8mm": shifted[s]} for s, ncc in nccs.items()]
                 ).to_csv(tmp_path / "reg.tsv", sep="\t", index=False)
    summarise = ["summarise", "--registrations", str(tmp_path / "reg.tsv"),
                 "--out-dir", str(tmp_path / "out"), "--figure", str(tmp_path / "rel.png")]
    assert calibration.main([*summarise, "--fold", str(tmp_path / "fold1"), "sub-01,sub-02",
                             "--fold", str(tmp_path / "fold2"), "sub-03,sub-04"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    oof = calibration.chosen_for(summary, "out-of-fold")
    assert oof["train"] == ["sub-01", "sub-02", "sub-03", "sub-04"] and oof["test"] == []
    assert oof["temperature_fitted"] == pytest.approx(2.0, rel=0.15) and oof["temperature_kept"]
    # the folds' own choices are made on their (calibrated) training subjects' runs
    assert calibration.chosen_for(summary, "fold2")["temperature_fitted"] == pytest.approx(1.0, rel=0.15)
    # every subject's registrations: halfway between 0.45 (worst) and 0.3 (best shifted)
    assert oof["registration_min"]["with_skull"] == pytest.approx(0.375)
    assert calibration.chosen_for(summary, "fold2")["registration_min"]["with_skull"] == pytest.approx(0.35)
    with pytest.raises(SystemExit, match="out-of-fold"):
        calibration.chosen_for(summary, "fold9")
    model = save_tiny_model(tmp_path / "final.pt")
    assert calibration.main(["store", "--summary", str(tmp_path / "out" / "summary.json"),
                             "--fold", "out-of-fold", "--model", str(model)]) == 0
    stored = load_checkpoint(model).metadata.calibration
    assert stored["temperature"] == pytest.approx(oof["temperature_fitted"], abs=1e-4)
    assert "out-of-fold run" in stored["chosen_on"]
    # one fold leaves subjects untested: no out-of-fold choices, and store says why
    assert calibration.main([*summarise, "--fold", str(tmp_path / "fold1"), "sub-01,sub-02"]) == 0
    with pytest.raises(SystemExit, match="every fold"):
        calibration.chosen_for(json.loads((tmp_path / "out" / "summary.json").read_text()),
                               "out-of-fold")
    # a subject tested by two folds is refused
    with pytest.raises(SystemExit, match="disjoint"):
        calibration.main([*summarise, "--fold", str(tmp_path / "fold1"), "sub-01,sub-02",
                          "--fold", str(tmp_path / "fold2"), "sub-02,sub-03,sub-04"])
