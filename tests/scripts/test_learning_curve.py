"""scripts/learning_curve.py: validation Dice against training hours."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from tests.scripts import load_script

def _run(folder: Path, dice: list[float]) -> Path:
    folder.mkdir(parents=True)
    rows = "".join(f"{i}\t1.0\t{3600 * i / 1000:.1f}\n" for i in range(10, 1010, 10))
    (folder / "train_log.tsv").write_text("iteration\tloss\tseconds\n" + rows)
    val = "".join(f"{250 * (k + 1)}\tsub-07_T1w\t{d}\n{250 * (k + 1)}\tmean\t{d}\n"
                  for k, d in enumerate(dice))
    (folder / "val_log.tsv").write_text("iteration\timage\tdice\n" + val)
    return folder


def test_curve_and_figure(tmp_path: Path):
    module = load_script("learning_curve")
    a = _run(tmp_path / "a", [0.5, 0.6, 0.65, 0.7])
    b = _run(tmp_path / "b", [0.55, 0.62])
    assert module.curve(a)[1] == (500, 0.5, 0.6)  # 500 iterations = 1800 s = 0.5 h
    tsv, svg = tmp_path / "curve.tsv", tmp_path / "curve.svg"
    assert module.main(["--run", "fold1", str(a), "--run", "fold2", str(b), "--tsv", str(tsv),
                        "--svg", str(svg)]) == 0
    lines = tsv.read_text().splitlines()
    assert lines[0] == "run\titeration\thours\tdice" and len(lines) == 7
    root = ET.fromstring(svg.read_text())  # well-formed SVG
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2 and len(root.findall(f"{ns}circle")) == 6
