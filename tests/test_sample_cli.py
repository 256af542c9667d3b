"""`scalegen sample`: completion grids for every mask SPEC, --class / --classes, one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalegen.cli.main import main


@pytest.fixture(scope="module")
def pixelcnn_run(train_recipe, tmp_path_factory) -> Path:
    """The tiny class-conditional PixelCNN on the 8x8 digits, a few steps."""
    return train_recipe("pixelcnn/tiny", tmp_path_factory.mktemp("runs") / "pixelcnn", "trainer.max_steps=4",
                        "trainer.val_check_interval=4")


def _grid_size(n_images: int, rows: int, h: int = 8, w: int = 8, pad: int = 1) -> tuple[int, int]:
    """(width, height) of plots.image_grid: pad-separated cells, upscaled by 256 // width."""
    width, height = n_images * (w + pad) + pad, rows * (h + pad) + pad
    scale = max(1, 256 // width)
    return width * scale, height * scale


@pytest.mark.parametrize("spec", ["bottom", "right", "box:1,2,6,5", "random:0.5", "PNG"])
def test_completion_grid_for_every_mask_spec(pixelcnn_run: Path, tmp_path: Path, spec: str) -> None:
    if spec == "PNG":
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 255  # white = missing
        spec = str(tmp_path / "mask.png")
        Image.fromarray(mask).save(spec)
    out = tmp_path / "grid.png"
    assert main(["sample", str(pixelcnn_run), "--complete", "test:4", "--mask", spec, "--n", "3",
                 "--out", str(out)]) == 0
    img = Image.open(out)
    img.load()
    assert img.size == _grid_size(4, 2 + 3)  # rows: originals, masked inputs, 3 completions


def test_completion_of_png_files_and_folders(pixelcnn_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "grid.png"
    assert main(["sample", str(pixelcnn_run), "--complete", str(folder), "--class", "3", "--n", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == _grid_size(2, 4)
    assert main(["sample", str(pixelcnn_run), "--complete", str(folder / "0.png"), "--class", "3", "--n", "1",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == _grid_size(1, 3)


@pytest.mark.parametrize("args,message", [
    (["--complete", "test:2", "--mask", "box:5,5,2,2"], "the box must lie inside"),
    (["--complete", "test:2", "--mask", "random:2"], "missing fraction"),
    (["--complete", "test:2", "--mask", "top"], "use bottom, right"),
    (["--complete", "IMGS"], "class-conditional: give the images' class"),
    (["--classes", "0-10"], "class 10 is out of range"),
])
def test_bad_input_is_one_line(pixelcnn_run: Path, tmp_path: Path, capsys, args, message) -> None:
    if "IMGS" in args:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
        args = [str(tmp_path / "a.png") if a == "IMGS" else a for a in args]
    assert main(["sample", str(pixelcnn_run), *args, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_classes_grid_has_one_row_per_class(pixelcnn_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "classes.png"
    assert main(["sample", str(pixelcnn_run), "--classes", "0-9", "--n", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == _grid_size(3, 10)
    assert main(["sample", str(pixelcnn_run), "--class", "3", "--n", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == _grid_size(2, 2)


def test_unconditional_and_non_completing_families_refuse(train_recipe, tmp_path: Path, capsys) -> None:
    run = train_recipe("dcgan/tiny", tmp_path / "gan", "trainer.max_epochs=null", "trainer.max_steps=2",
                       "ema.enabled=false")
    assert main(["sample", str(run), "--complete", "test:2", "--out", str(tmp_path / "g.png")]) == 2
    assert "cannot complete images" in capsys.readouterr().err
    assert main(["sample", str(run), "--class", "3", "--out", str(tmp_path / "g.png")]) == 2
    assert "not class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("recipe", ["ddpm/tiny", "vae/tiny", "ebm/tiny"])
def test_diffusion_vae_and_ebm_complete_from_the_command_line(train_recipe, tmp_path: Path, recipe: str) -> None:
    run = train_recipe(recipe, tmp_path / "run", "trainer.max_epochs=null", "trainer.max_steps=3")
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--complete", "test:3", "--mask", "right", "--n", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == _grid_size(3, 4)
