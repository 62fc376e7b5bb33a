"""Evaluation metrics on known inputs: ECE, reliability bins, confusion matrix, mean ± sd, report blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dicom_fusion.inference.report.document import Heading, Image, Paragraph, Table, to_html, to_markdown
from dicom_fusion.inference.train.scores import (
    binary_metrics,
    confusion,
    expected_calibration_error,
    format_mean_sd,
    mean_sd,
    reliability_curve,
    summarise,
)


def test_ece_known_values() -> None:
    # 10 cases at p=0.8 of which 5 positive: |0.5 - 0.8| = 0.3 on all cases.
    assert expected_calibration_error(np.array([1] * 5 + [0] * 5), np.full(10, 0.8)) == pytest.approx(0.3)
    # Perfectly calibrated bins: p=0.25 with 1/4 positive, p=0.75 with 3/4 positive.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0)
    # Two bins with different gaps, weighted by their share of cases (3/4 and 1/4).
    y = np.array([0, 0, 0, 1])
    p = np.array([0.05, 0.05, 0.05, 0.95])
    assert expected_calibration_error(y, p) == pytest.approx(0.75 * 0.05 + 0.25 * 0.05)


def test_reliability_bins_are_right_closed() -> None:
    curve = reliability_curve(np.array([0, 1, 1, 0]), np.array([0.0, 0.1, 0.1001, 1.0]), n_bins=10)
    assert curve.counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert curve.frequency[0] == pytest.approx(0.5) and math.isnan(curve.frequency[2])


def test_confusion_matrix_and_threshold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.5, 0.9, 0.2])
    assert confusion(y, p).tolist() == [[2, 1], [1, 2]]  # [[TN, FP], [FN, TP]]
    assert confusion(y, p, threshold=0.95).tolist() == [[3, 0], [3, 0]]


def test_binary_metrics_known_values() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.5, 0.9, 0.2])
    m = binary_metrics(y, p)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(6 / 9)  # 6 of the 9 positive/negative pairs ordered correctly
    assert math.isnan(binary_metrics(np.ones(3, int), np.full(3, 0.7))["roc_auc"])
    with pytest.raises(ValueError, match="probabilities"):
        binary_metrics(y, p * 2)
    with pytest.raises(ValueError, match="one probability per case"):
        binary_metrics(y, p[:3])


def test_mean_sd_and_summary() -> None:
    assert mean_sd([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1))
    assert mean_sd([0.5]) == (0.5, 0.0)
    summary = summarise([{"roc_auc": 0.8, "ece": 0.1}, {"roc_auc": 0.9, "ece": 0.2}])
    assert set(summary) == {"roc_auc", "ece"} and summary["roc_auc"][0] == pytest.approx(0.85)
    assert format_mean_sd((0.81234, 0.0456)) == "0.812 ± 0.046"
    assert format_mean_sd((math.nan, math.nan)) == "n/a"


def test_report_blocks_render_to_markdown_and_html() -> None:
    blocks = [
        Heading(1, "R"),
        Paragraph("a < b"),
        Table(("model", "AUC"), (("x|y", "0.9"),)),
        Image("roc.png", "ROC"),
    ]
    md = to_markdown(blocks)
    assert "# R" in md and "| x\\|y | 0.9 |" in md and "![ROC](roc.png)" in md
    page = to_html(blocks, "t")
    assert "a &lt; b" in page and '<img src="roc.png"' in page
    with pytest.raises(ValueError, match="cells"):
        Table(("a", "b"), (("1",),))
