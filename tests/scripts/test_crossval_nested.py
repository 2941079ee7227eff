"""scripts/crossval_nested.py: per fold, the choice on training subjects and the test rows."""

import pandas as pd

from tests.scripts import load_script

crossval_nested = load_script("crossval_nested")


def table(path, rows):
    frame = pd.DataFrame([{"method": m, "subject": s, "structure": f"S{k}", "dice": d, "nsd": d}
                          for m, s, dice in rows for k, d in enumerate(dice)])
    frame.to_csv(path, sep="\t", index=False)
    return path


def test_writes_one_fold_table_with_the_chosen_variant_and_the_baseline(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    fold = table(tmp_path / "all.tsv", [
        ("CA-Diff (skull on)", "sub-02", [0.6, 0.6]), ("CA-Diff + em (skull on)", "sub-02", [0.7, 0.7]),
        ("CA-Diff (skull on)", "sub-01", [0.8, 0.8]), ("CA-Diff + em (skull on)", "sub-01", [0.9, 0.9]),
    ])
    base = table(tmp_path / "ma.tsv", [("Multi-Atlas", "sub-01", [0.5, 0.5]),
                                       ("Multi-Atlas", "sub-02", [0.4, 0.4])])
    out = tmp_path / "out"
    assert crossval_nested.main(["--fold", str(fold), "sub-01", "--candidates", "CA-Diff,CA-Diff + em",
                                 "--baseline", str(base), "--out-dir", str(out)]) == 0
    written = pd.read_csv(out / "fold1.tsv", sep="\t")
    assert set(written["subject"]) == {"sub-01"}
    assert set(written["method"]) == {"CA-Diff (skull on)", "CA-Diff + em (skull on)",
                                      "CA-Diff + variant chosen on training subjects (skull on)",
                                      "Multi-Atlas"}
    assert "chosen on the other subjects: CA-Diff + em" in caplog.text
