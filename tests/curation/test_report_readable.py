"""`dinosys-curate run` says where its outputs went and which stages it reused or ran; the
report shows the dedup decision (candidates, verified removals, chosen threshold) together, recall
and precision when the pool lists its planted copies, example pairs big enough to see, the
selection as a table and the stage summaries as tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from curation.cli import main
from tests.curation.conftest import write_config


def _run(capsys, *argv: str) -> tuple[list[str], dict]:
    assert main(["run", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_run_prints_outputs_and_reused_stages_and_report_is_readable(
        tmp_path: Path, curation_inputs: dict, random_export: Path, capsys) -> None:
    photos = curation_inputs["photos"]
    original = sorted(p for p in photos.glob("*.png") if p.stat().st_size > 0)[0]
    # the same pixels in other bytes: not an exact duplicate, an embedding copy (similarity 1)
    Image.open(original).save(photos / "zz_same_pixels.png", compress_level=1)
    distinct = sorted(p.name for p in photos.glob("*.png") if p.stat().st_size > 0
                      and p.name not in (original.name, "exact_copy.png", "zz_same_pixels.png"))
    (photos / "planted.json").write_text(json.dumps(["zz_same_pixels.png", distinct[0]]))
    out = tmp_path / "work"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export,
                       tmp_path / "not_used", **{"dedup.threshold": 0.999})
    lines, summary = _run(capsys, str(cfg), "--out", str(out))
    assert not (tmp_path / "not_used").exists()  # --out replaces the config's out
    shards = out / "shards"
    assert lines[0] == "stages reused (inputs and config unchanged): -"
    assert lines[1] == ("stages run now: ingest, embed, knn, dedup, cluster, retrieve, shards, "
                        "report")
    assert re.fullmatch(rf"shards:   {re.escape(str(shards))} \(\d+ shard\(s\), \d+ images\)",
                        lines[2])
    assert lines[3] == f"manifest: {shards / 'manifest.parquet'}"
    assert lines[4] == f"report:   {shards / 'curation_report.html'}"
    assert summary["manifest"] == str(shards / "manifest.parquet")
    assert Path(summary["report_html"]).is_file()

    # the report: planted-copy recall / precision against the manifest
    m = pq.read_table(shards / "manifest.parquet").to_pydict()
    removed = {Path(p).name for p, r in zip(m["path"], m["reason"])
               if r.startswith("near_duplicate")}
    assert "zz_same_pixels.png" in removed and distinct[0] not in removed
    quality = summary["report"]["planted_quality"]
    assert quality == {"planted": 2, "removed": len(removed), "recall": 0.5,
                       "precision": round(1 / len(removed), 3)}
    html = (shards / "curation_report.html").read_text()
    assert "<tr><td>recall of the planted copies (this run)</td><td>0.5</td></tr>" in html
    assert "<tr><td>chosen cosine threshold</td><td>0.999</td></tr>" in html
    assert (f"<tr><td>images removed as near-duplicates (this run)</td><td>{len(removed)}</td>"
            in html)
    # the sweep table: recall/precision of the embedding alone per threshold
    assert "<th>recall (embedding alone)</th>" in html
    assert re.search(r'<tr class="chosen"><td>0.999</td><td>\d+</td><td>\d+</td><td>[\d.]+</td>'
                     rf'<td>[\d.]+</td><td>{len(removed)}</td></tr>', html)
    # the stage summaries and the selection are tables, not raw JSON
    assert "<code>{" not in html and "<h3>dedup</h3><table>" in html
    assert "<td>all sources</td>" in html
    # example pairs big enough to see
    examples = Image.open(shards / "report" / "sweep_examples.png")
    assert examples.size[0] >= 700 and examples.size[1] >= 350

    # a rerun reuses every stage and says so
    lines, summary = _run(capsys, str(cfg), "--out", str(out), "dedup.threshold=0.999")
    assert summary["ran"] == [] and "report" in summary["reused"]
    assert lines[1] == "stages run now: -"
    # a changed dedup threshold redoes dedup and what follows, nothing before
    lines, summary = _run(capsys, str(cfg), "--out", str(out), "dedup.threshold=0.9999")
    assert summary["reused"] == ["ingest", "embed", "knn"]
    assert summary["ran"] == ["dedup", "cluster", "retrieve", "shards", "report"]
    assert "<tr><td>chosen cosine threshold</td><td>0.9999</td></tr>" in \
        (shards / "curation_report.html").read_text()


def test_report_without_planted_list_has_no_quality_rows(tmp_path: Path, curation_inputs: dict,
                                                         random_export: Path, capsys) -> None:
    out = tmp_path / "work"
    cfg = write_config(tmp_path / "c.yaml", curation_inputs, random_export, out)
    _, summary = _run(capsys, str(cfg))
    assert "planted_quality" not in summary["report"]
    html = (out / "shards" / "curation_report.html").read_text()
    assert "recall" not in html
    # the chosen threshold (not among the swept ones) has its own highlighted sweep row
    assert 0.99995 not in [r["threshold"] for r in
                           json.loads((out / "dedup" / "sweep.json").read_text())]
    assert '<tr class="chosen"><td>0.99995</td>' in html
