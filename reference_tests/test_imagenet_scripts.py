"""The ImageNet recipe scripts (scripts/imagenet/): each prints its estimate (time per epoch, node-hours,
from a timed step of the stage's model on this machine) and then the training commands, which
python -m minibvit.train must accept. Run at a tiny model size in dry-run mode."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "scripts", "imagenet")
sys.path.insert(0, SCRIPTS)

import estimate  # noqa: E402

from minibvit import methods, train  # noqa: E402

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

TINY = "--image-size 32 --patch-size 8 --embed-dim 32 --depth 2 --num-heads 2 --num-classes 10 --images 1000"
RECIPES = {"binaryvit_deit_s": "binaryvit", "tervit_deit_s": "tervit", "gsb_deit_s": "gsb"}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry_run(recipe, tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update({"DATA": str(tmp_path / "imagenet"), "OUT": str(tmp_path / "out"), "DRY_RUN": "1",
                    "PYTHON": sys.executable, "ESTIMATE_ARGS": TINY, **env})
    result = subprocess.run(["bash", os.path.join(SCRIPTS, f"{recipe}.sh")], capture_output=True, text=True,
                            env=environ, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@needs_bash
def test_gsb_recipe_prints_the_estimate_and_launches_with_mpiexec(tmp_path):
    out = _dry_run("gsb_deit_s", tmp_path, NODES="2", RANKS_PER_NODE="2")
    stage_lines = [line for line in out.splitlines() if "node-hours" in line and "per epoch" in line]
    assert [line.split()[0] for line in stage_lines] == ["teacher", "gsb_stage1", "gsb"]
    assert "total" in out and "2 node(s)" in out
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert len(commands) == 2 and all(c.startswith("mpiexec -n 4 ") for c in commands)
    assert out.index("node-hours") < out.index("+ mpiexec")  # the estimate comes before anything starts
    assert not (tmp_path / "out").exists()  # a dry run trains nothing


@needs_bash
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_commands_are_accepted_by_the_trainer(recipe, tmp_path):
    out = _dry_run(recipe, tmp_path, ESTIMATE_ARGS=TINY + " --depth 1")
    commands = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert commands and all(c[1:3] == ["-m", "minibvit.train"] for c in commands)  # one rank: no launcher
    methods_run = []
    for argv in commands:
        args = train._parser().parse_args(argv[3:])
        cfg = train.TrainConfig(**{**vars(args), "teacher": None})  # the teacher file does not exist yet
        methods.check_options(cfg.method, cfg.method_options())
        assert cfg.dataset == "imagenet" and cfg.model == "deit-small" and cfg.resume
        methods_run.append(cfg.method)
    assert methods_run[-1] == RECIPES[recipe]


def test_estimate_scales_the_measured_step_by_images_epochs_and_nodes():
    result = estimate.estimate("binaryvit", {"teacher": 0, "binaryvit": 7}, image_size=16, patch_size=8, embed_dim=16,
                               depth=1, num_heads=2, num_classes=5, batch=2, nodes=3, images=600)
    assert result["stages"]["teacher"] == {"epochs": 0}
    s = result["stages"]["binaryvit"]
    assert s["per_image_s"] == pytest.approx(s["step_s"] / 2, rel=1e-12)
    assert s["node_hours"] == pytest.approx(7 * 600 * s["per_image_s"] / 3600, rel=1e-12)
    assert s["epoch_h"] == pytest.approx(600 * s["per_image_s"] / 3600 / 3, rel=1e-12)
    assert result["wall_hours"] == pytest.approx(result["node_hours"] / 3, rel=1e-12)
    assert "binaryvit" in estimate.report(result) and "node-hours" in estimate.report(result)


def test_estimate_refuses_stage_epochs_that_do_not_fit_the_method():
    with pytest.raises(ValueError, match="not a stage of tervit"):
        estimate.parse_stage_epochs("fp=1,teacher=3", "tervit")
    with pytest.raises(ValueError, match="no epochs for stage"):
        estimate.parse_stage_epochs("fp=1", "tervit")
    assert estimate.parse_stage_epochs("fp=1,tervit_w8a8=2,tervit=0", "tervit") == {"fp": 1, "tervit_w8a8": 2, "tervit": 0}
