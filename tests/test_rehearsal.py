"""bench/rehearsal.py end to end at tiny sizes (--small): cluster.py kmeans + assign over extract-format features,
torchrun train.py on 2 ranks killed after its first checkpoint and resumed on 3, export to Hugging Face, probe.
Then a re-run skips every finished step (the resume ledger is the JSON itself)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(work: Path, out: Path, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "bench/rehearsal.py", "--small", "--work-dir", str(work), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


@pytest.mark.slow
@pytest.mark.bench
def test_rehearsal_small(tmp_path):
    work, out = tmp_path / "work", tmp_path / "rehearsal.json"
    _run(work, out, timeout=540)
    res = json.loads(out.read_text())
    sizes = res["sizes"]

    a = res["phase_a"]
    assert a["k"] == sizes["k"] and a["rows"] == sizes["k"] * sizes["rows_per_center"] and a["d"] == sizes["dim"]
    assert a["refine_iters"] == sizes["refine_iters"] and a["refine_probe"] == 16 and a["niter"] == 20
    assert 0.0 <= a["assign"]["recall_at_8"] <= 1.0 and a["assign"]["recall_at_8"] > 0.5
    assert a["kmeans"]["wall_s"] > 0 and a["kmeans"]["peak_rss_mb"] > 0 and a["assign"]["peak_rss_mb"] > 0
    assert 0 <= a["empty_centers"] <= a["k"]
    obj = a["objective"]
    assert 0 < obj["mean_cos_nearest_learned_center"] <= 1 and 0 < obj["mean_cos_nearest_generating_center"] <= 1
    assert obj["mean_cos_nearest_learned_center"] > 0.8 * obj["mean_cos_nearest_generating_center"]
    assert a["kmeans"]["total_flop"] > 0 and all(v > 0 for v in a["gemm_gflop_per_s_median"].values())
    assert a["scaling_to_paper"]["paper_refine_pass_pflop"] == pytest.approx(2.4576)   # README: 2.5 PFLOP
    labels_man = json.loads((work / "a" / "cluster" / "labels" / "manifest.json").read_text())
    assert labels_man["num_classes"] == sizes["k"] and labels_man["complete"]

    b = res["phase_b"]
    assert b["num_classes"] == sizes["classes"]
    assert 0 < b["killed_after_step"] < sizes["steps"]
    assert b["kill"]["ranks_alive_after"] == []
    assert b["resumed_from_step"] == b["killed_after_step"] and b["resumed_world_size"] == 3
    assert b["final_step"] == sizes["steps"] and b["final_checkpoint_world_size"] == 3
    assert len(b["per_rank_memory_2ranks"]) == 2 and len(b["per_rank_memory_3ranks"]) == 3
    assert all(r["peak_rss_mb"] > 0 and r["planned_tensor_peak_mb"] > 0 for r in b["per_rank_memory_3ranks"])
    resumed = res["steps"]["b_train_3ranks_resumed"]
    assert resumed["last_metrics_step"] == sizes["steps"]
    assert [r["step"] for r in resumed["steps_logged"]] == list(range(1, sizes["steps"] + 1))
    assert b["export_max_abs_difference"] is not None and b["export_max_abs_difference"] <= 1e-4
    assert 0.0 <= b["probe"]["lp_acc1"] <= 1.0
    assert res["met"] is True

    from mlcd.models.hf import load_hf_model   # the export loads with transformers' from_pretrained
    hf = load_hf_model(b["export_dir"])
    assert type(hf).__name__ == b["export_hf_class"]

    # re-running resumes: every step is found in the JSON and skipped
    p = _run(work, out, timeout=120)
    assert p.stdout.count("done before, skipped") == len(res["steps"])
    assert json.loads(out.read_text())["steps"] == res["steps"]
