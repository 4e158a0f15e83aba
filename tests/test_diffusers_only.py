"""An exported class-conditioned pipeline loads and samples with diffusers alone, as it does with the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusion_lightning import ClassConditionedPipeline, ClassConditionedUnet
from tests.conftest import tiny_config, tiny_ddpm

#: Run in a fresh interpreter: diffusion_lightning cannot be imported (checked), the folder loads with
#: ``custom_pipeline`` and generates; the images go to an .npy file.
SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "diffusion_lightning" or name.startswith("diffusion_lightning."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import diffusion_lightning  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("diffusion_lightning is importable: the blocker does not block")

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    images = pipe([0, 1, 2, 1], num_inference_steps=4, guidance_scale=2.5, generator=generator, output_type="np").images
    np.save(out, images)
    print("CLASSES", type(pipe).__module__, type(pipe.unet).__module__)
    print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] == "diffusion_lightning"))
    """
)


def run_without_package(tmp_path: Path, folder: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "diffusers_only.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-I", str(script), str(folder), str(tmp_path / "images.npy")]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def reference_images(pipeline: ClassConditionedPipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    return pipeline(
        [0, 1, 2, 1], num_inference_steps=4, guidance_scale=2.5, generator=generator, output_type="np"
    ).images


@pytest.mark.parametrize("conditioning", ["class_embedding", "concat"])
def test_exported_pipeline_samples_the_same_with_diffusers_alone(tmp_path, conditioning):
    torch.manual_seed(0)
    module = tiny_ddpm(net=tiny_config(conditioning=conditioning), class_names=["zero", "one", "two"])
    folder = module.export_pipeline(tmp_path / "pipe")
    assert (folder / "pipeline.py").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    if conditioning == "concat":  # diffusers' custom component: the class's module in its folder
        assert index["unet"] == ["class_conditioned", "ClassConditionedUnet"]
        assert (folder / "unet" / "class_conditioned.py").is_file()
    else:
        assert index["unet"] == ["diffusers", "UNet2DModel"]

    done = run_without_package(tmp_path, folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED []" in done.stdout, done.stdout  # nothing of the package was imported
    assert "CLASSES diffusers_modules.local.pipeline" in done.stdout, done.stdout
    alone = np.load(tmp_path / "images.npy")

    # the package's own loading: its classes, no code of the folder run, the same images
    loaded = ClassConditionedPipeline.from_pretrained(folder)
    assert type(loaded) is ClassConditionedPipeline
    assert isinstance(loaded.unet, ClassConditionedUnet) == (conditioning == "concat")
    assert loaded.config.class_names == ["zero", "one", "two"]
    packaged = reference_images(loaded)
    in_process = reference_images(module.build_pipeline())
    assert alone.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(alone, in_process, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packaged, in_process, atol=1e-5, rtol=0)


def test_the_folders_code_runs_only_when_trusted(tmp_path):
    folder = tiny_ddpm(net=tiny_config(conditioning="concat")).export_pipeline(tmp_path / "pipe")
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers' own rule for a folder's code
        DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder))


@pytest.mark.parametrize("shape, nrow", [((6, 1, 8, 8), 2), ((5, 3, 8, 8), 3), ((1, 1, 8, 8), 4), ((7, 1, 5, 5), 8)])
def test_the_pipelines_own_grids_equal_the_packages(shape, nrow):
    """The pipeline module draws its grids without the package; they are the package's grids, pixel for pixel."""
    from diffusion_lightning.pipelines.class_conditioned import _label_grid, _make_grid
    from diffusion_lightning.utils.images import label_grid, make_grid

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    grid = make_grid(images, nrow=nrow)
    torch.testing.assert_close(_make_grid(images, nrow=nrow), grid, rtol=0, atol=0)
    rows = ["zero", "one", "two", "three"][: -(-shape[0] // nrow)]
    np.testing.assert_array_equal(np.asarray(_label_grid(grid, rows, scale=2)), np.asarray(label_grid(grid, rows, 2)))
