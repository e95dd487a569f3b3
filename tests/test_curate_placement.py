"""Curation uses the GPUs Ray finds and says where it runs (perceptio/curate/placement.py)."""

from __future__ import annotations

import json

import pytest

from perceptio.curate.distributor import RayConfig, TeacherSpec
from perceptio.curate.placement import actors_per_gpu, place
from perceptio.errors import PerceptioError

LARGE = TeacherSpec(model="depth-anything/Depth-Anything-V2-Large-hf")
SMALL = TeacherSpec(model="depth-anything/Depth-Anything-V2-Small-hf")


def test_found_gpus_are_used_with_actors_per_gpu_from_the_teacher_size():
    large = place(RayConfig(), LARGE, gpus=8, cpus=64)
    assert large.config.num_gpus_per_worker == 1.0 and large.config.model_workers == 8 and large.warning is None
    assert large.summary == ("curation: 8 Depth-Anything-V2-Large-hf shard task(s) at once, 1 per GPU, on 8 GPU(s); "
                             "64 CPUs in the cluster")
    small = place(RayConfig(), SMALL, gpus=2, cpus=32)
    assert small.config.num_gpus_per_worker == 0.25 and small.config.model_workers == 8


def test_overrides_win():
    assert place(RayConfig(actors_per_gpu=3), LARGE, gpus=2, cpus=8).config.model_workers == 6
    asked = place(RayConfig(num_gpus_per_worker=0.5, model_workers=3), LARGE, gpus=4, cpus=8).config
    assert asked.num_gpus_per_worker == 0.5 and asked.model_workers == 3


def test_gpus_present_but_none_used_warns():
    placement = place(RayConfig(num_gpus_per_worker=0.0), LARGE, gpus=4, cpus=16)
    assert placement.config.num_gpus_per_worker == 0.0 and placement.config.model_workers == 1
    assert "4 GPU(s) found but --num-gpus-per-worker 0" in placement.warning
    assert "4 GPU(s) unused" in placement.summary


def test_no_gpu_runs_on_cpu_quietly_and_refuses_to_ask_for_gpus():
    placement = place(RayConfig(), LARGE, gpus=0, cpus=2)
    assert placement.config.num_gpus_per_worker == 0.0 and placement.warning is None
    assert "on CPU (no GPU found)" in placement.summary
    with pytest.raises(PerceptioError, match="Ray sees none"):
        place(RayConfig(num_gpus_per_worker=1.0), LARGE, gpus=0, cpus=2)


def test_ground_truth_depth_needs_no_gpu(tmp_path):
    placement = place(RayConfig(), TeacherSpec(source="gt", depth_dir=str(tmp_path)), gpus=8, cpus=8)
    assert placement.config.num_gpus_per_worker == 0.0 and placement.warning is None


def test_actors_per_gpu_reads_a_local_teacher_width(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"backbone_config": {"hidden_size": 384}}))
    assert actors_per_gpu(TeacherSpec(model=str(tmp_path))) == 4
    (tmp_path / "config.json").write_text(json.dumps({"backbone_config": {"hidden_size": 1024}}))
    assert actors_per_gpu(TeacherSpec(model=str(tmp_path))) == 1
    assert actors_per_gpu(TeacherSpec(model="depth-anything/Depth-Anything-V2-Base-hf")) == 2
