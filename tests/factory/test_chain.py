"""The whole chain at a tiny size (pool -> curate -> pretrain -> distill, text_align ->
evaluate -> export) and its provenance: an exported student followed back to the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dinosys.cli import main
from dinosys.factory.record import sha256_file
from dinosys.factory.runner import load_pipeline, run_pipeline

TINY_SUITE = """- name: mnist
  evaluator: knn
  train: "{builtin}/mnist/train"
  val: "{builtin}/mnist/val"
  k: [10]
"""
TEXT_SUITE = """- name: mnist
  evaluator: zeroshot
  val: "{builtin}/mnist/val"
  templates: "{configs}/clip/mnist_templates.txt"
"""


def tiny_chain(tmp: Path, builtin: Path) -> Path:
    """The demo pipeline with 20 planted duplicates, 10 planted val copies, a few steps each."""
    (tmp / "suite.yaml").write_text(TINY_SUITE)
    (tmp / "text_suite.yaml").write_text(TEXT_SUITE)
    path = tmp / "tiny.yaml"
    path.write_text(f"""
_base_: demo
name: tiny
data: {builtin}
pool: {{near_duplicates: 20, contamination: 10}}
pretrain:
  overrides:
    - data.builtin_root={{builtin}}
    - max_steps=10
    - eval.knn_every_n_steps=0
    - log.progress=false
distill:
  overrides:
    - data.builtin_root={{builtin}}
    - max_steps=5
    - log.progress=false
    - eval.knn_train={{builtin}}/mnist/train
    - eval.knn_val={{builtin}}/mnist/val
text_align:
  overrides:
    - data.builtin_root={{builtin}}
    - max_steps=5
    - eval.zeroshot_every_n_steps=0
    - log.progress=false
evaluate: {{suite: {tmp / 'suite.yaml'}, text_suite: {tmp / 'text_suite.yaml'}}}
export: {{formats: [native, timm]}}
""")
    return path


@pytest.mark.slow
def test_chain_exports_carry_provenance_back_to_the_manifest(
        builtin_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pipe"
    summary = run_pipeline(load_pipeline(str(tiny_chain(tmp_path, builtin_data))), out)
    assert summary["status"] == "finished"
    assert [k for k, v in summary["stages"].items() if v["status"] == "ran"] == [
        "pool", "curate", "pretrain", "distill", "text_align", "evaluate", "export"]
    curate = summary["stages"]["curate"]["numbers"]
    assert curate["planted val copies kept"] == 0 and curate["planted dups removed"] == 1.0

    # the student's export -> its provenance -> the manifest the data came from
    assert main(["info", str(out / "export" / "small"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chain = info["provenance"]
    manifest = Path(chain["curation"]["manifest"])
    assert sha256_file(manifest) == chain["curation"]["manifest_sha256"]
    rows = pq.read_table(manifest).to_pydict()
    pool = [i for i, role in enumerate(rows["role"]) if role == "pool"]
    assert chain["curation"]["kept"] == sum(rows["status"][i] == "kept" for i in pool) == 4000
    assert chain["curation"]["removed_near_duplicates"] == 20
    assert chain["curation"]["removed_contamination"] == 10
    teacher = Path(chain["teacher"]["path"])
    assert sha256_file(teacher / "model.safetensors") == chain["teacher"]["sha256"]
    assert chain["training"]["stage"] == "distill" and chain["training"]["steps"] == 5
    assert sha256_file(Path(chain["training"]["run_dir"]) / "config.yaml") == chain[
        "training"]["config_sha256"]
    assert set(chain["evaluation"]) >= {"mnist/knn/top1_k10"}
    # the teacher it names was trained on the shards of the same manifest
    teacher_cfg = json.loads((out / "export" / "teacher" / "config.json").read_text())
    assert teacher_cfg["provenance"]["curation"] == chain["curation"]
    assert "## Provenance" in (out / "export" / "small" / "README.md").read_text()
    text = json.loads((out / "export" / "text" / "config.json").read_text())
    assert text["model_type"] == "clip" and "mnist/zeroshot/top1" in text["provenance"][
        "evaluation"]
    assert (out / "export" / "small" / "timm" / "model.safetensors").is_file()
    assert (out / "export" / "text" / "onnx" / "model.onnx").is_file()
    # the readable block names every link
    assert main(["info", str(out / "export" / "small")]) == 0
    block = capsys.readouterr().out
    for word in ("curation:", str(manifest), "teacher:", "training:", "evaluation:"):
        assert word in block
