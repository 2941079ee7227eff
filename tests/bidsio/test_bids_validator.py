"""The derivatives dataset our writers produce passes bids-validator-deno (offline).

The deno validator ships its schema and needs no network; ``--format json`` gives
machine-readable issues.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np

from bids_cadiff.bidsio import derivatives as d
from bids_cadiff.labels import SYNTHSEG32


def test_output_dataset_is_valid_bids(tmp_path, bids_skeleton, make_nifti, validator_exe):
    raw = bids_skeleton({"01": {"1": [{}, {"acq": "fast", "rec": "norm", "run": "2"}]}, "02": [{}]})
    out = tmp_path / "derivatives" / "cadiff"
    d.init_derivatives(out, raw, SYNTHSEG32)
    for t1w, ents in [
        (raw / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", {"subject": "01", "session": "1"}),
        (raw / "sub-01/ses-1/anat/sub-01_ses-1_acq-fast_rec-norm_run-2_T1w.nii.gz",
         {"subject": "01", "session": "1", "acquisition": "fast", "reconstruction": "norm",
          "run": "2"}),
        (raw / "sub-02/anat/sub-02_T1w.nii.gz", {"subject": "02"}),
    ]:
        src = make_nifti()
        lab = np.zeros(src.shape, dtype=np.int16)
        lab[1:4, 2:6, 3:8] = 17
        lab[5:7] = 2
        d.save_label_map(d.dseg_path(out, ents), lab, src.affine, src.header)
        rel = t1w.relative_to(raw).as_posix()
        d.write_dseg_sidecar(d.dseg_sidecar_path(out, ents), d.dseg_sidecar(
            sources=[f"bids:raw:{rel}"], model_name="m", model_version="1", model_sha256="0" * 64,
            steps=5, seed=0, device="cpu", run_time_s=1.0, registration={"MI": 0.3}))
        d.write_volumes_tsv(d.volumes_path(out, ents), d.compute_volumes(lab, 1.8, SYNTHSEG32),
                            ents)
        for kind in d.FIGURE_KINDS:
            fig = d.figure_path(out, ents, kind)
            fig.parent.mkdir(parents=True, exist_ok=True)
            fig.write_bytes(b"\x89PNG\r\n\x1a\n")
        # the uncertainty map (always) and the 4D class probabilities (--save-probabilities)
        unc = d.save_probability_map(d.uncertainty_path(out, ents),
                                     (lab > 0).astype(np.uint8) * 40, src.affine, src.header)
        d.write_json(d.image_sidecar_path(unc), d.image_sidecar("u", [f"bids:raw:{rel}"]))
        probs = np.zeros((*src.shape, len(SYNTHSEG32.entries)), np.uint8)
        probs[..., 0] = 255
        prob = d.save_probability_map(d.probseg_path(out, ents), probs, src.affine, src.header)
        d.write_json(d.image_sidecar_path(prob), d.image_sidecar("p", [f"bids:raw:{rel}"]))
        d.write_qc_table(d.qc_table_path(out, ents), [{"index": 2, "flags": []}],
                         ["index", "flags"])
        d.write_json(d.error_record_path(out, ents), {"Error": "x"})
    d.write_group_volumes(out, [{"participant_id": "sub-01", "TotalBrain": 1.0}],
                          ["participant_id", "TotalBrain"], SYNTHSEG32)
    for subject in ("01", "02"):
        d.participant_report_path(out, subject).write_text("<html></html>")
    d.group_report_path(out).write_text("<html></html>")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "config-1.toml").write_text("a = 1\n")

    proc = subprocess.run([str(validator_exe), str(out), "--format", "json", "--no-color"],
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    issues = report["issues"]["issues"]
    errors = [(i["code"], i.get("location"), i.get("issueMessage")) for i in issues
              if i["severity"] == "error"]
    assert errors == [], errors
    assert proc.returncode == 0, proc.stderr
    warnings = {i["code"] for i in issues if i["severity"] == "warning"}
    assert "NIFTI_UNIT" not in warnings
