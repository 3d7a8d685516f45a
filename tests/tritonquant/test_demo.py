import re
import subprocess
import sys

import pytest
import torch

from tritonquant.cli import main
from tritonquant.demo import codec_table, pick_device, realistic_activation


def test_demo_command_runs_and_prints_both_workloads():
    result = subprocess.run(
        [sys.executable, "-m", "tritonquant", "demo", "--steps", "1"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ReLU mask exact" in out and "CNN" in out and "transformer" in out
    for bits in (8, 4, 2):
        assert re.search(rf"^{bits}-bit\s+\d\.\d{{4}}", out, re.MULTILINE), f"no {bits}-bit gradient row"
    assert out.count("total") == 2  # one per-module report per workload
    # The step's peak memory, as a ratio to exact training's: compression must lower it (on the CPU, too).
    for bits in (4, 2):
        rows = re.findall(rf"^{bits}-bit\s+(.*)$", out, re.MULTILINE)
        assert len(rows) == 2
        assert all(float(row.split()[5]) < 0.8 for row in rows), rows


def test_codec_table_shows_exact_relu_masks_and_ratios():
    table = codec_table(realistic_activation(torch.device("cpu")))
    rows = [line.split() for line in table.splitlines()[2:]]
    assert len(rows) == 8 and all(row[-1] == "yes" for row in rows)
    ratios = {int(row[1]): float(row[4]) for row in rows if row[0] == "minmax"}
    assert ratios[8] < ratios[4] < ratios[2] < ratios[1]


def test_bad_demo_arguments_are_explained():
    with pytest.raises(ValueError, match="device must be one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (["demo", "--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["bench", "--quick", "--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["bench", "--budget-gb", "-1"], "argument --budget-gb: expected a number > 0, got -1"),
    (["bench", "--out", __file__], "argument --out: .* is a file, not a folder"),
    (["bench", "--plots", __file__], "argument --plots: .* is a file, not a folder"),
], ids=["demo-device", "demo-steps", "bench-steps", "bench-budget", "bench-out-file", "bench-plots-file"])
def test_bad_command_line_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_demo_on_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda"])
    assert exit_info.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


def test_every_width_is_warmed_up_before_any_step_peak_is_read(monkeypatch):
    # On a GPU a width's first step tunes its launch configs (the candidates' buffers count in that step's
    # peak): each width the demo measures must have run once before the first measured step.
    import tritonquant.demo as demo
    from tritonquant.models import SmallCNN, cnn_batch, cnn_loss

    log = []
    compress, step_peak = demo.compress, demo._step_peak

    def logged_compress(bits):
        log.append(bits)
        return compress(bits=bits)

    def logged_step_peak(step, device):
        log.append("measure")
        return step_peak(step, device)

    monkeypatch.setattr(demo, "compress", logged_compress)
    monkeypatch.setattr(demo, "_step_peak", logged_step_peak)
    monkeypatch.setattr(demo, "_workloads", lambda device: {
        "cnn (small)": (lambda: SmallCNN(width=8, blocks=1), cnn_loss, lambda step: cnn_batch(4, seed=step))})
    demo.training_comparison(torch.device("cpu"), steps=1)
    warm_up = log[:log.index("measure")]
    assert sorted(warm_up) == sorted(demo.DEMO_BITS), log
