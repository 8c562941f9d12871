"""MediaPipe Tasks and gray images (docs/integration.md section 2): what fails, and the app's fix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool


def test_gray_file_fails_on_an_rgb_model_and_the_documented_conversion_fixes_it(tmp_path):
    peer = load_tool("mediapipe_gray")
    import sys

    sys.path.insert(0, str(peer.ROOT / "tests" / "host"))
    import mediapipe_peer

    try:
        report = peer.check(tmp_path)
    except mediapipe_peer.MediaPipeUnavailable as exc:
        pytest.skip(f"MediaPipe cannot be installed here: {exc}")
    gray = report["gray_file"]
    assert gray["format"] == "GRAY8" and gray["shape"] == [16, 16, 1]
    assert "TfLiteTensor and Tensor sizes do not match" in gray["error"] and "scores" not in gray
    litert = np.array(report["litert_scores_3_channels"])
    for case in ("rgb_file", "gray_converted_to_srgb"):
        np.testing.assert_allclose(report[case]["scores"], litert, atol=1e-6, err_msg=case)
