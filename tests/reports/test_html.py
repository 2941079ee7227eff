"""HTML reports from the files of a fake derivatives dataset (see conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.reports.html import (
    group_report_html,
    participant_report_html,
    robust_z_scores,
    write_group_report,
    write_participant_report,
)
from tests.reports.conftest import ERROR_MESSAGE, FAILED, FINISHED, OUTLIER

SUBJECTS = ("01", "02", "03", "04", "05", "06", "07", "08")


class _Page(HTMLParser):
    """Ids, links, image sources and <section> ids of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.images: list[str] = []
        self.sections: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "section":
            self.sections.append(attrs.get("id", ""))


def _check_links(page_path: Path) -> _Page:
    """Every image and link of the page resolves to an existing file (and anchor)."""
    page = _Page(page_path.read_text(encoding="utf-8"))
    for src in page.images:
        assert not urlsplit(src).scheme, src
        assert (page_path.parent / unquote(src)).is_file(), f"missing image {src}"
    for href in page.links:
        parts = urlsplit(href)
        assert not parts.scheme and not parts.netloc, f"external link {href}"
        target = page_path if not parts.path else page_path.parent / unquote(parts.path)
        assert target.is_file(), f"{page_path.name}: broken link {href}"
        if parts.fragment:
            ids = _Page(target.read_text(encoding="utf-8")).ids
            assert unquote(parts.fragment) in ids, f"{page_path.name}: no anchor for {href}"
    return page


def _assert_offline(text: str) -> None:
    assert "http" not in text  # no URL at all: no CDN, no web font, no remote image
    assert "url(" not in text and "@import" not in text
    assert not re.search(r'(?:src|href)="(?!data:,")[a-zA-Z][a-zA-Z0-9+.-]*:', text)


@pytest.fixture(scope="module")
def written(fake_derivatives):
    root = fake_derivatives.root
    start = time.perf_counter()
    pages = {s: write_participant_report(root, s) for s in SUBJECTS}
    pages["group"] = write_group_report(root)
    return pages, time.perf_counter() - start


def test_participant_report_has_a_section_per_image_and_working_links(fake_derivatives, written):
    pages, elapsed = written
    root = fake_derivatives.root
    assert pages["01"] == deriv.participant_report_path(root, "01") == root / "sub-01.html"
    assert elapsed < 2.0, f"{len(pages)} reports took {elapsed:.2f} s"
    page = _check_links(pages["01"])
    assert page.sections == ["sub-01_ses-1", "sub-01_ses-2_run-1", "sub-01_ses-2_run-2"]
    assert len(page.images) == 8  # four figures for each finished T1w
    assert "sub-01/figures/sub-01_ses-2_run-1_desc-cadiff_registration.png" in page.images
    text = pages["01"].read_text(encoding="utf-8")
    _assert_offline(text)
    for title in ("Label overlay", "Label contours", "Uncertainty", "Registration check",
                  "QC flags", "QC table", "Provenance"):
        assert text.count(f">{title}</h3>") == 2
    # provenance from the sidecar
    assert "ab" * 32 in text and "cadiff-synthseg32" in text
    for field in ("Software versions", "Stage times (s)", "Random seed", "Sampling steps",
                  "Refinement", "Run time (s)", "ForegroundDice"):
        assert field in text
    assert "sampling</th><td>40.2" in text
    # the failed image: its message, escaped
    assert '<span class="badge failed">failed</span>' in text
    assert "registration diverged: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in text
    assert "<script" not in text
    assert ERROR_MESSAGE not in text


def test_participant_report_shows_qc_flags_and_the_qc_table(written):
    text = written[0]["04"].read_text(encoding="utf-8")
    assert '<span class="badge fail">QC fail</span>' in text
    assert "2 flag(s)" in text
    assert "<td>registration</td><td>image</td><td class=num>0.61</td>" in text
    assert "<td>ForegroundDice &gt;= 0.8</td><td>atlas &lt;b&gt;misplaced&lt;/b&gt;</td>" in text
    assert "R-HI volume far from the training set" in text
    # the QC table: every structure, the flagged one highlighted
    for column in ("volume_mm3", "volume_soft_mm3", "volume_sd_mm3", "volume_fraction"):
        assert f"<th class=num>{column}</th>" in text
    flagged_rows = re.findall(r'<tr class=flagged>(.*?)</tr>', text)
    assert len(flagged_rows) == 1 and "Right-Hippocampus" in flagged_rows[0]
    assert "Left-Hippocampus" in text and "Left-Lateral-Ventricle" in text


def test_participant_report_of_outputs_from_an_older_version(written):
    page = _check_links(written[0]["03"])
    text = written[0]["03"].read_text(encoding="utf-8")
    assert page.images == ["sub-03/figures/sub-03_desc-cadiff_dseg.png"]
    assert "No QC table" in text and "older version" in text
    assert "No QC record in the sidecar" in text
    assert "No label contours figure" in text and "No uncertainty figure" in text
    assert '<span class="badge na">QC n/a</span>' in text


def test_participant_report_of_a_participant_whose_only_image_failed(written):
    page = _check_links(written[0]["08"])
    text = written[0]["08"].read_text(encoding="utf-8")
    assert page.sections == ["sub-08"] and page.images == []
    assert "0 T1w image(s) segmented, 1 failed" in text
    assert "2026-01-02T03:04:05+00:00" in text and "bids:raw:sub-08/anat/sub-08_T1w.nii.gz" in text


def test_participant_report_of_an_unknown_participant(fake_derivatives, tmp_path):
    text = participant_report_html(fake_derivatives.root, "sub-99")
    assert "No outputs and no error records for sub-99" in text


def test_group_report_links_outliers_failures_and_every_image(fake_derivatives, written):
    pages, _ = written
    path = pages["group"]
    assert path == fake_derivatives.root / "group" / "desc-cadiff_report.html"
    page = _check_links(path)  # every link resolves, anchors included
    text = path.read_text(encoding="utf-8")
    _assert_offline(text)
    assert "<script" not in text and "&lt;script&gt;" in text
    # outliers: the robust one and the QC-flagged one, each linked to its T1w's section
    outliers = text.split('id="outliers"')[1].split('id="volumes"')[0]
    rows = re.findall(r"<tr><td>(.*?)</tr>", outliers)
    assert len(rows) == 2
    subject, structure = OUTLIER
    assert f'<a href="../{subject}.html#{subject}">{subject}</a>' in rows[1]
    assert structure in rows[1] and "robust z +" in rows[1]
    assert '<a href="../sub-04.html#sub-04">sub-04</a>' in rows[0] and "QC: R-HI" in rows[0]
    # in the plots, the outlier is a red point linked to its report
    assert re.search(rf'<a href="\.\./{subject}\.html#{subject}"><circle class="out"', text)
    assert text.count("<svg") == 2 * 5 + 1 + 2 + 1  # raw, % per structure; total; reg.; unc.
    assert text.count('<table class="dist">') == 3
    # failed images with reasons
    failed = text.split('id="failed"')[1].split('id="outliers"')[0]
    for prefix in FAILED:
        assert f"#{prefix}\">{prefix}</a>" in failed
    assert failed.count("registration diverged") == 2
    # QC status of every image, from the sidecars (and the TSV's qc column)
    status = text.split('id="status"')[1]
    for prefix in [*FINISHED, *FAILED]:
        assert f">{prefix}</a>" in status
    assert status.count("QC pass") == 6 and status.count("QC fail") == 1
    assert "10 T1w image(s): 6 QC pass, 1 QC fail, 1 without QC, 2 failed" in text
    # registration: sub-04's poor foreground Dice is a (low) outlier
    registration = text.split('id="registration"')[1].split('id="uncertainty"')[0]
    assert re.search(r'href="\.\./sub-04\.html#sub-04"><circle class="out"', registration)
    assert "Mean voxel uncertainty in the brain" in text
    assert set(page.links) >= {f"../{p.split('_')[0]}.html#{p}" for p in [*FINISHED, *FAILED]}


def test_group_report_tolerates_missing_files_and_columns(fake_derivatives, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(fake_derivatives.root, root)
    sidecar = deriv.dseg_sidecar_path(root, {"subject": "02"})
    sidecar.write_text("{not json", encoding="utf-8")
    text = group_report_html(root)
    # sub-02's sidecar is unreadable: its status comes from the table's qc column
    status = text.split('id="status"')[1]
    assert re.search(r'>sub-02</a></td><td><span class="badge pass">', status)
    assert "cannot read sub-02_desc-cadiff_dseg.json" in participant_report_html(root, "02")

    table = deriv.group_volumes_path(root)
    lines = table.read_text(encoding="utf-8").splitlines()
    without_qc = ["\t".join(line.split("\t")[:-1]) for line in lines]  # qc is the last column
    table.write_text("\n".join(without_qc) + "\n", encoding="utf-8")
    text = group_report_html(root)
    assert "Outlying volumes" in text and 'class="out"' in text
    status = text.split('id="status"')[1]
    assert re.search(r'>sub-02</a></td><td><span class="badge na">', status)

    table.unlink()
    text = group_report_html(root)
    assert "No group volume table" in text
    assert text.count("registration diverged") == 2  # failures still listed


def test_urls_in_sidecars_are_text_never_links(fake_derivatives, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(fake_derivatives.root, root)
    path = deriv.dseg_sidecar_path(root, {"subject": "02"})
    fields = json.loads(path.read_text(encoding="utf-8"))
    url = 'https://example.org/x"><img src=y>'
    fields["GeneratedBy"] = [{"Name": "bids_cadiff", "CodeURL": url}]
    path.write_text(json.dumps(fields), encoding="utf-8")
    text = write_participant_report(root, "02").read_text(encoding="utf-8")
    assert "https://example.org/x&quot;&gt;&lt;img src=y&gt;" in text
    assert not re.search(r'(?:src|href)="https?:', text) and "<img src=y>" not in text


def test_robust_z_scores():
    z = robust_z_scores([10, 11, 9, 10, 12, 30])
    assert z[-1] > 3 and np.all(np.abs(z[:-1]) < 3)
    assert np.isnan(robust_z_scores([1.0, 2.0, 3.0, 100.0])).all()  # fewer than 5 images
    z = robust_z_scores([5, 5, 5, 5, 5, 9])  # MAD 0: mean absolute deviation instead
    assert z[-1] > 3 and (z[:-1] == 0).all()
    assert np.isnan(robust_z_scores([2.0] * 6)).all()
    z = robust_z_scores([1, 2, np.nan, 3, 4, 5])
    assert np.isnan(z[2]) and np.isfinite(np.delete(z, 2)).all()


def test_doctests():
    import doctest

    from bids_cadiff.reports import figures, html

    for module in (figures, html):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_group_report_links_only_to_existing_participant_reports(fake_derivatives, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(fake_derivatives.root, root)
    for report in root.glob("sub-*.html"):
        report.unlink()
    write_participant_report(root, "04")
    path = write_group_report(root)
    page = _check_links(path)
    assert page.links and all(link.startswith("../sub-04.html#") for link in page.links
                              if not link.startswith("#"))
    subject, _ = OUTLIER
    assert f'<span title="no participant report">{subject}</span>' in path.read_text()
