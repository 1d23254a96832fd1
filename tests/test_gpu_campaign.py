"""The GPU campaign's rehearsal: ``benchmarks/gpu_campaign.sh --dry-run`` runs every stage at tiny sizes on the CPU.

It checks the script's plumbing (stage timeouts, packing of results into ``$OUT`` after each stage, summary rows)
and that every stage's command runs: the e2e stages are the real ``diffaccel bench e2e`` CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from diffaccel.bench.e2e_report import check_document

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_campaign.sh"
STAGES = ("env", "wheels", "tests", "kernels", "e2e", "locality")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    env = {**os.environ, "OUT": str(out), "CAMPAIGN_WORK": str(work), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=540)  # fmt: skip
    return done, out, work


def test_dry_run_passes_every_stage(dry_run):
    done, out, _ = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")}  # fmt: skip
    assert list(rows) == list(STAGES)
    assert set(rows.values()) == {"ok"}, rows
    assert sorted(p.name for p in out.iterdir()) == ["campaign.log", "campaign.tar.gz", "summary.md"]  # <= 8 files


def test_dry_run_results_are_packed(dry_run):
    _, out, tmp = dry_run
    with tarfile.open(out / "campaign.tar.gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp / "unpacked", filter="data")
    results = tmp / "unpacked" / "results"
    assert {f"./{s}.log" for s in STAGES} <= set(names)
    assert len(list(results.glob("*-cpu-kernels-tiny.json"))) == 1
    assert len(list(results.glob("*-cpu-locality-tiny.json"))) == 1
    for model, refused in (("flux-dev", {"tile"}), ("wan21-1.3b", set())):
        (path,) = results.glob(f"*-cpu-e2e-{model}-tiny.json")
        doc = json.loads(path.read_text())
        check_document(doc)
        assert [r["method"] for r in doc["rows"]] == ["stock", "dense", "gna", "tile"]
        assert {r["method"] for r in doc["rows"] if r["status"] == "refused"} == refused
        assert all(len(r["step_ms_all"]) == 1 for r in doc["rows"] if r["status"] == "ok")
        assert "--model-config flux-dev,wan21-1.3b" in doc["meta"]["command"] and doc["meta"]["kernel_path"] == "triton-interpreter"
    assert (results / next(results.glob("*-e2e-flux-dev-tiny.json")).name.replace(".json", ".png")).exists()


def test_campaign_rejects_unknown_options():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
