"""The run report: the arrays its plots draw (from a metrics.jsonl written here), the page it
writes, its command line, and the PNG check CI runs on a screenshot of it."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from moetrain.report import build_report, history, png
from moetrain.report.__main__ import main as report_main


def train_row(step: int, loss: float, load: list[list[float]], **extra) -> dict:
    dead = [sum(1 for share in layer if share == 0) for layer in load]
    row = {"step": step, "loss": loss, "tokens_per_s": 100.0 * step, "dropped_frac": step / 100}
    return {**row, "expert_load": load, "dead_experts": dead, **extra}


LOAD_A = [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
LOAD_B = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]


def write_metrics(run_dir: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_series_are_the_rows_values(tmp_path):
    rows = [
        {"step": 0, "val_loss": 6.0, "val_bpt": 8.6},
        train_row(2, 5.0, LOAD_A, dropped_frac_by_position=[0.0, 0.2]),
        train_row(4, 4.0, LOAD_B, dropped_frac_by_position=[0.2, 0.4]),
        {"step": 4, "val_loss": 4.5, "val_bpt": 6.5},
    ]
    got = history.read_history(write_metrics(tmp_path, rows, tail='{"step": 6, "lo'))
    curves = history.loss_curves(got)
    np.testing.assert_array_equal(curves["loss"][0], [2, 4])
    np.testing.assert_array_equal(curves["loss"][1], [5.0, 4.0])
    np.testing.assert_array_equal(curves["val_loss"][0], [0, 4])
    np.testing.assert_array_equal(curves["val_loss"][1], [6.0, 4.5])
    np.testing.assert_array_equal(history.throughput(got)[1], [200.0, 400.0])
    steps, shares = history.expert_load(got)
    np.testing.assert_array_equal(steps, [2, 4])
    assert shares.shape == (2, 2, 4)  # layers, steps, experts
    np.testing.assert_array_equal(shares[0], [LOAD_A[0], LOAD_B[0]])
    np.testing.assert_array_equal(shares[1, :, 3], [0.25, 0.4])
    np.testing.assert_array_equal(history.dead_experts(got)[1], [[2, 0], [0, 0]])
    np.testing.assert_array_equal(history.drop_rates(got)[1], [0.02, 0.04])
    np.testing.assert_allclose(history.drops_by_position(got), [0.1, 0.3])


def test_dense_model_has_no_expert_load():
    rows = [{"step": 1, "loss": 3.0, "expert_load": [], "dead_experts": []}]
    steps, shares = history.expert_load(rows)
    assert steps.tolist() == [1] and shares.shape == (0, 1, 0)
    assert history.dead_experts(rows)[1].shape == (0, 1)
    assert history.drops_by_position(rows).size == 0


def test_a_rewind_in_the_file_is_not_counted_twice():
    """A process logged steps 1..3 (val at 2), a resume from step 1 logged 2..3 again."""
    first = [train_row(1, 9.0, LOAD_A), train_row(2, 8.0, LOAD_A), {"step": 2, "val_loss": 8.5}]
    first.append(train_row(3, 7.0, LOAD_A))
    second = [train_row(2, 8.1, LOAD_B), {"step": 2, "val_loss": 8.4}, train_row(3, 7.1, LOAD_B)]
    kept = history.drop_rewound(first + second)
    assert [(r["step"], r.get("loss", r.get("val_loss"))) for r in kept] == [
        (1, 9.0),
        (2, 8.1),
        (2, 8.4),
        (3, 7.1),
    ]


def test_an_evaluation_rerun_replaces_the_earlier_one():
    rows = [{"step": 0, "val_loss": 5.0}, {"step": 0, "val_loss": 4.0}, train_row(1, 3.0, LOAD_A)]
    assert [r.get("val_loss") for r in history.drop_rewound(rows)] == [4.0, None]


def test_step_edges():
    np.testing.assert_array_equal(history.step_edges(np.array([5])), [4.5, 5.5])
    np.testing.assert_array_equal(history.step_edges(np.array([2, 4, 5])), [1, 3, 4.5, 5.5])
    assert history.step_edges(np.array([], dtype=np.int64)).size == 0


def images(page: str) -> list[bytes]:
    import base64

    parts = page.split('src="data:image/png;base64,')[1:]
    return [base64.b64decode(p.split('"', 1)[0]) for p in parts]


def test_one_step_run_gets_a_full_report_without_warnings(tmp_path):
    run_dir = write_metrics(tmp_path / "run", [train_row(1, 5.0, LOAD_B)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: "identical low and high xlims" and a blank plot
        report = build_report(run_dir)
    page = report.html.read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    pngs = images(page)
    assert len(pngs) == 4  # loss, throughput, expert load, drops
    assert report.expert_load == run_dir / "expert_load.png"
    assert report.expert_load.read_bytes() == pngs[2]
    heatmap = png.ink(png.read_rgb(report.expert_load))
    assert heatmap.colours > 100 and heatmap.non_white > 0.3
    assert "1 .. 1" in page  # the summary's steps


def test_dense_run_report_has_no_expert_load_figure(tmp_path):
    run_dir = write_metrics(tmp_path, [{"step": 1, "loss": 3.0, "expert_load": []}])
    report = build_report(run_dir)
    assert report.expert_load is None and not (tmp_path / "expert_load.png").exists()
    assert len(images(report.html.read_text())) == 3


def test_command_line_rebuilds_and_names_a_missing_file(tmp_path, capsys):
    run_dir = write_metrics(tmp_path / "run", [train_row(1, 5.0, LOAD_A)])
    assert report_main([str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()
    assert report_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no metrics.jsonl" in err[0]


def test_importing_the_trainer_and_report_does_not_import_matplotlib():
    code = (
        "import sys, moetrain.train.trainer, moetrain.report; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- the PNG check ------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body)
    return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")


def _filtered(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    out = bytearray()
    for i, value in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b, c = prev[i], prev[i - bpp] if i >= bpp else 0
        pred = [0, a, b, (a + b) // 2, png._paeth(a, b, c)][kind]
        out.append((value - pred) & 255)
    return bytes(out)


def encode_png(pixels: np.ndarray) -> bytes:
    """An RGB(A) PNG whose rows use filter types 0..4 in turn."""
    height, width, channels = pixels.shape
    colour = {3: 2, 4: 6}[channels]
    raw, prev = bytearray(), bytes(width * channels)
    for y in range(height):
        row = pixels[y].tobytes()
        raw += bytes([y % 5]) + _filtered(y % 5, row, prev, channels)
        prev = row
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, colour, 0, 0, 0])
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw)))
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_png_decoder_undoes_every_filter(channels):
    pixels = np.random.default_rng(0).integers(0, 256, (11, 7, channels), dtype=np.uint8)
    np.testing.assert_array_equal(png.decode_png(encode_png(pixels)), pixels)


def test_png_decoder_agrees_with_pillow_on_a_matplotlib_figure(tmp_path):
    run_dir = write_metrics(tmp_path, [train_row(1, 5.0, LOAD_A), train_row(2, 4.0, LOAD_B)])
    path = build_report(run_dir).expert_load
    assert path is not None
    from PIL import Image

    with Image.open(path) as image:
        expected = np.asarray(image)
    np.testing.assert_array_equal(png.decode_png(path.read_bytes()), expected)


def test_ink_tells_a_blank_page_from_a_drawn_one(tmp_path):
    blank = np.full((20, 30, 3), 255, dtype=np.uint8)
    assert png.ink(blank) == png.Ink(colours=1, non_white=0.0)
    drawn = blank.copy()
    drawn[:5, :6] = [[[r, 0, 0] for r in range(6)]]  # 6 colours on 30 of 600 pixels
    assert png.ink(drawn) == png.Ink(colours=7, non_white=0.05)
    path = tmp_path / "blank.png"
    path.write_bytes(encode_png(blank))
    assert png.main([str(path)]) == 1
    path.write_bytes(encode_png(np.concatenate([drawn, np.zeros((20, 30, 1), np.uint8)], 2)))
    assert png.ink(png.read_rgb(path)) == png.Ink(colours=1, non_white=0.0)  # transparent
