"""CLI: bad input is one line on stderr, exit 2, before Ray is even imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = (
    "import sys; from prelora_ray.cli import main; rc = main(sys.argv[1:]); "
    "assert 'ray' not in sys.modules, 'Ray was imported before the error'; sys.exit(rc)"
)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    "args, must_name",
    [
        (["train", "--set", "prelora.tau=0"], "prelora.tau"),
        (["train", "--set", "prelora.zeta=-1"], "prelora.zeta"),
        (["train", "--set", "prelora.k=1"], "prelora.k"),
        (["train", "--set", "prelora.m=0"], "prelora.m"),
        (["train", "--set", "prelora.warmup=-2"], "prelora.warmup"),
        (["train", "--set", "prelora.r_min=6"], "prelora.r_min"),
        (["train", "--set", "prelora.r_min=32", "--set", "prelora.r_max=16"], "prelora.r_min"),
        (["train", "--set", "prelora.modules=[query,dense]"], "prelora.modules"),
        (["train", "--set", "cluster.num_workers=0"], "cluster.num_workers"),
        (["train", "--set", "prelora.tua=1"], "prelora.tau"),  # unknown key: nearest name suggested
        (["train", "--set", "epoch=3"], "epochs"),
        (["train", "--set", "data.name=imagefolder", "--set", "data.root=/does/not/exist"], "data.root"),
        (["train", "--set", "data.name=cifar10", "--set", "data.root=/does/not/exist"], "data.root"),
        (["train", "--set", "model.patch_size=3"], "model.patch_size"),
        (["train", "--config", "/does/not/exist.yaml"], "/does/not/exist.yaml"),
        (["tune", "/does/not/exist.yaml"], "/does/not/exist.yaml"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_before_ray(tmp_path, args, must_name):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert must_name in lines[0]
    assert "Traceback" not in proc.stderr


def test_empty_imagefolder_split_is_rejected_before_ray(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    proc = _cli("train", "--set", "data.name=imagefolder", "--set", f"data.root={tmp_path / 'data'}", cwd=tmp_path)
    assert proc.returncode == 2 and "data.root" in proc.stderr and "no images" in proc.stderr


def test_help_config_lists_every_key():
    from prelora_ray.config import valid_keys

    proc = subprocess.run(
        [sys.executable, "-m", "prelora_ray.cli", "train", "--help-config"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for key in valid_keys():
        assert key in proc.stdout
