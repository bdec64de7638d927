"""fashion-generate: new photos and sketches through the generate stages' own code."""

import re

import numpy as np
import pytest
from PIL import Image

from stages.common import dataset
from stages.common.errors import StageError
from stages.common.io import load_rgb
from fashion.generate import main
from fashion.sketch import LEFT, TILE, TOP, sheet_size
from tests.conftest import image_diff


def test_a_photo_gives_what_the_generate_stages_gave(finished_project, caplog):
    """An eval image as a 'new' photo, with its prompt and seed: the same edges, and the same
    baseline and LoRA images as generate-baseline and generate-lora drew."""
    caplog.set_level("INFO", logger="stages")
    p = finished_project
    paths = p.typed().paths
    config = dataset.load_eval_configs(paths.eval_data)[1]
    seed = p.params["generate"]["seed"] + config["index"]
    main([str(dataset.gt_path(paths.eval_data, config["index"])), "--prompt", config["prompt"], "--seeds", str(seed),
          "--out", "out"])
    name = f"{config['index']:06d}"
    assert np.array_equal(load_rgb(f"out/{name}-edges.png"), load_rgb(dataset.edge_path(paths.edges, config["index"])))
    for variant in dataset.VARIANTS:
        made = load_rgb(f"out/{name}-seed{seed}-{variant}.png")
        staged = load_rgb(dataset.generated_path(paths, variant, config["index"]))
        # the stage drew it in a batch of 4: batching is not bit-exact on CPU, so +-2 on uint8
        assert image_diff(made, staged) <= 2, variant
    assert "resized" not in caplog.text
    assert "tokens, but CLIP reads" not in caplog.text, "a prompt that fits says nothing"


def test_a_sketch_of_another_size_is_resized_and_inverted(finished_project, caplog):
    """Also: a prompt past CLIP's 77 tokens (BOS and EOS included), which the pipeline cuts, gets one
    line of its own with the count and what is dropped."""
    caplog.set_level("INFO", logger="stages")
    p = finished_project
    resolution = p.params["extract"]["resolution"]
    sketch = np.full((90, 120, 3), 255, np.uint8)  # black lines on white, not square
    sketch[20:70, 40] = sketch[20:70, 80] = sketch[20, 40:81] = 0
    Image.fromarray(sketch).save("sketch.png")
    prompt = "Mini skirt in navy, " + "a" * 55 + " with long pleats"
    main(["sketch.png", "--sketch", "--prompt", prompt, "--count", "2", "--seed", "5", "--out", "out"])
    assert "is 120x90; centre-cropped and resized to the model's" in caplog.text and "inverted" in caplog.text
    said = re.search(r"fashion-generate: --prompt is (\d+) tokens, but CLIP reads the first 75: the rest "
                     r"\('(.+)'\) is ignored; shorten the prompt", caplog.text)
    assert said and int(said[1]) > 75 and prompt.endswith(said[2]), caplog.text
    edges = load_rgb("out/sketch-edges.png")
    assert edges.shape == (resolution, resolution, 3) and edges.mean() < 127, "white lines on black"
    for seed in (5, 6):
        for variant in dataset.VARIANTS:
            assert load_rgb(f"out/sketch-seed{seed}-{variant}.png").shape == (resolution, resolution, 3)
    assert not np.array_equal(load_rgb("out/sketch-seed5-lora.png"), load_rgb("out/sketch-seed6-lora.png"))
    with Image.open("out/sketch-side-by-side.png") as opened:
        sheet = np.asarray(opened.convert("RGB"))
    assert sheet.shape[:2] == sheet_size(2, resolution)[::-1]
    tile = max(TILE, resolution)
    # each tile is its image upscaled, nothing drawn over it; the labels are written around them
    lora = np.asarray(Image.open("out/sketch-seed6-lora.png").resize((tile, tile), Image.Resampling.NEAREST))
    assert np.array_equal(sheet[TOP + tile:TOP + 2 * tile, LEFT + 2 * tile:LEFT + 3 * tile], lora)
    assert sheet[:TOP].min() < 128 and sheet[TOP:, :LEFT].min() < 128, "the prompt, titles and seeds are written"


def test_bad_inputs_are_one_line(finished_project, tmp_path):
    p = finished_project
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StageError, match=r"notes.png: not a readable image"):
        main([str(tmp_path / "notes.png"), "--prompt", "Dress"])
    with pytest.raises(StageError, match=r"--prompt: empty"):
        main([str(tmp_path / "notes.png"), "--prompt", "  "])
    gt = str(dataset.gt_path(p.typed().paths.eval_data, 0))
    import shutil
    shutil.rmtree(p.path("lora"))
    with pytest.raises(StageError, match=r"models/lora: not found; run `make demo` \(tiny models\) or `dvc pull` first"):
        main([gt, "--prompt", "Dress"])


def test_only_png_jpeg_and_webp_are_read(finished_project, tmp_path):
    """A BMP (or an EPS, which PIL renders with Ghostscript) named .png is not decoded: one line."""
    Image.new("RGB", (8, 8)).save(tmp_path / "drawing.png", format="BMP")
    with pytest.raises(StageError) as raised:
        main([str(tmp_path / "drawing.png"), "--prompt", "Dress"])
    assert str(raised.value) == f"{tmp_path / 'drawing.png'}: not a readable image (cannot identify image file); " \
                                "give a PNG, JPEG or WebP photo or sketch (no other format is read)"


def test_a_transparent_sketch_is_drawn_on_white(finished_project):
    rgba = np.zeros((64, 64, 4), np.uint8)  # transparent page, opaque black lines
    rgba[10:50, 20, 3] = rgba[10:50, 44, 3] = 255
    Image.fromarray(rgba, "RGBA").save("lines.png")
    main(["lines.png", "--sketch", "--prompt", "Trousers", "--out", "out"])
    edges = load_rgb("out/lines-edges.png")
    assert edges[30, 20].min() == 255 and edges[30, 30].max() == 0, "the lines, white on black"


def test_argument_mistakes_are_one_line(finished_project):
    gt = str(dataset.gt_path(finished_project.typed().paths.eval_data, 0))
    for argv, message in ((["--prompt", "x"], "the following arguments are required: input"),
                          ([gt, "--prompt", "x", "--steps", "many"], "argument --steps: invalid int value"),
                          ([gt, "--prompt", "x", "--seeds", "1", "--count", "2"], "--seeds and --count: give one"),
                          ([gt, "--prompt", "x", "--low", "200", "--high", "100"], "need 0 <= low <= high"),
                          (["missing.png", "--prompt", "x"], "missing.png: not found; give the path")):
        with pytest.raises(StageError, match=message):
            main(argv)


def drawn_outline(garment, size: int, width: int) -> np.ndarray:
    """A demo garment's outline, black on a white page, `size` px: a sketch as a person draws it."""
    import cv2

    from stages.demo.garments import IMAGE_SIZE, _silhouette

    page = np.full((size, size, 3), 255, np.uint8)
    polygons = [(p.astype(np.float64) * size / IMAGE_SIZE).round().astype(np.int32) for p in _silhouette(garment)]
    cv2.polylines(page, polygons, True, (0, 0, 0), width, cv2.LINE_AA)
    return page


def sketch_edges(page: np.ndarray, resolution: int, shrunk_as_a_photo: bool = False):
    """The sketch's edge map and notes, as fashion-generate --sketch makes them from a PNG; or,
    shrunk as a photo, the inverted image before any threshold."""
    import io

    from fashion.sketch import edge_map, read_image

    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, format="PNG")
    image, notes = read_image(io.BytesIO(buffer.getvalue()), "sketch.png", resolution, not shrunk_as_a_photo)
    if shrunk_as_a_photo:
        return 255 - image[..., 0], []
    edges, more = edge_map(image, True, 100, 200)
    return np.asarray(edges)[..., 0], [note.text for note in notes + more]


def test_a_large_sketch_keeps_its_lines_as_0_255():
    """A 512-px sketch with 2-px lines, shrunk to the model's 64 px: the ControlNet gets 0/255
    lines where the same outline drawn at 64 px has them, as canny gave it in training. Shrunk as
    a photo (Lanczos), the lines fade to a haze and most are lost at mid-grey."""
    from stages.common.edge_scores import edge_map as scored, fidelity
    from stages.demo.garments import make_garments

    for garment in make_garments(seed=1, products=6):
        edges, _ = sketch_edges(drawn_outline(garment, 512, 2), 64)
        reference = 255 - drawn_outline(garment, 64, 1)[..., 0] > 127  # its anti-aliased fringe left out
        assert set(np.unique(edges)) <= {0, 255}
        assert fidelity(scored(edges, 1), scored(reference, 1))[2] >= 0.95, garment.name()
        haze, _ = sketch_edges(drawn_outline(garment, 512, 2), 64, shrunk_as_a_photo=True)
        assert haze.max() < 255 and fidelity(scored(haze > 127, 1), scored(reference, 1))[2] < 0.6


def test_a_faint_or_blank_sketch_says_so():
    from stages.demo.garments import make_garments

    pencil = drawn_outline(make_garments(seed=1, products=1)[0], 512, 2)
    pencil[pencil < 255] = 200  # light grey lines
    edges, notes = sketch_edges(pencil, 64)
    assert not edges.any() and any("its lines are too faint to keep" in note for note in notes), notes
    _, notes = sketch_edges(np.full((512, 512, 3), 255, np.uint8), 64)
    assert any("nearly empty edge map; is it a line drawing?" in note for note in notes), notes
