"""README.md's performance section is what ``benchmarks/readme_tables.py`` generates from the committed results."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffaccel.bench.readme_tables import BEGIN, END, current_section, generate, replace_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_readme_section_matches_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(BEGIN) == 1 and readme.count(END) == 1
    assert current_section(readme) == generate(RESULTS), "run python benchmarks/readme_tables.py --write"


def test_check_script_fails_on_a_stale_readme(tmp_path):
    for name in ("README.md",):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "readme_tables.py", tmp_path / "benchmarks" / "readme_tables.py")
    shutil.copytree(RESULTS, tmp_path / "benchmarks" / "results")
    shutil.copytree(ROOT / "diffaccel", tmp_path / "diffaccel")
    script = [sys.executable, str(tmp_path / "benchmarks" / "readme_tables.py")]
    readme = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text(replace_section(readme, "stale\n"))
    stale = subprocess.run([*script, "--check"], capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and "--write" in stale.stdout
    assert replace_section(replace_section(readme, "stale\n"), generate(RESULTS)) == readme


def test_gpu_e2e_results_enter_the_section_and_cpu_runs_do_not(tmp_path):
    from diffaccel.bench.e2e import E2EConfig, run_e2e

    shutil.copytree(RESULTS, tmp_path / "results")
    doc = run_e2e(E2EConfig(model_config="sd3.5-large", scale="tiny", backend="reference", methods=("dense", "tile"),
                            rounds=1, warmup=0, progress=False))  # fmt: skip
    (tmp_path / "results" / "cpu-e2e.json").write_text(json.dumps(doc))
    before = generate(tmp_path / "results")
    assert before == generate(RESULTS)  # a CPU run is not a performance result
    assert "end-to-end step benchmark" in before.split("Not measured on a GPU yet:")[1]
    doc["meta"].update(gpu="NVIDIA H200", device="cuda", cuda="13.0", driver="580")
    (tmp_path / "results" / "gpu-e2e.json").write_text(json.dumps(doc))
    after = generate(tmp_path / "results")
    assert "End-to-end, sd3.5-large 128x128" in after and "[gpu-e2e.json]" in after
    dense = next(r for r in doc["rows"] if r["method"] == "dense")
    assert f"| dense | {dense['step_ms']:.1f} (" in after and f"{dense['speedup']:.2f} (" in after
    assert "| tile | – | – |" in after and "refused: tile:" in after
    assert "end-to-end step benchmark" not in after.split("Not measured on a GPU yet:")[1]
    with pytest.raises(ValueError, match="markers"):
        replace_section("no markers here", "x")
