"""canny-edges is cv2.Canny on the ground truth with the params' thresholds, 3 channels."""

import cv2
import numpy as np

from stages.common import dataset
from stages.common.io import load_rgb


def test_edges_match_cv2_and_follow_thresholds(extracted):
    p = extracted
    configs = dataset.load_eval_configs(p.path("eval_data"))
    first = {}
    for c in configs:
        gt = load_rgb(dataset.gt_path(p.path("eval_data"), c["index"]))
        edges = load_rgb(dataset.edge_path(p.path("edges"), c["index"]))
        expected = cv2.Canny(gt, 100, 200)
        assert edges.shape == gt.shape
        np.testing.assert_array_equal(edges[..., 0], expected)
        np.testing.assert_array_equal(edges[..., 0], edges[..., 2])
        assert expected.any(), "every garment has edges"
        first[c["index"]] = edges
    p.run("canny_edges", canny__low_threshold=5, canny__high_threshold=10)
    looser = {c["index"]: load_rgb(dataset.edge_path(p.path("edges"), c["index"])) for c in configs}
    assert sum(int((looser[i] > 0).sum()) for i in looser) > sum(int((first[i] > 0).sum()) for i in first)
