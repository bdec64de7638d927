"""bench/gpu.py --tiny: every measurement runs through the project's own training and generation
code and lands in the table and the JSON. No timing is asserted: CI has no GPU."""

import json

from bench import gpu


def test_tiny_benchmark_measures_every_path(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = gpu.main(["--tiny", "--train-steps", "1", "--train-batches", "8", "--images", "2",
                       "--generate-batch", "2", "--generate-steps", "2", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    names = [r["name"] for r in result["rows"]]
    assert names == ["train: seed recipe", "train: train-lora, 4 per step", "train: train-lora, batch 8",
                     "generate: notebook recipe, 2 steps", "generate: generate stages, 2 steps",
                     "generate: notebook recipe, 3 steps", "generate: generate stages, 3 steps"]
    for row in result["rows"]:
        assert row["rate"] > 0 and row["tflops"] > 0, row
    assert [r["batch"] for r in result["rows"][:3]] == ["2x2", "4x1", "8x1"]
    assert result["rows"][1]["encode_images_per_s"] > 0 and "encode_images_per_s" not in result["rows"][0]
    assert result["seed_run_estimate_s"]["train_lora"] > 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-8].startswith("measurement") and table[-1].startswith("generate: generate stages, 3 steps")
