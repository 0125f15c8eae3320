"""Tests of evaluation/report.py: summaries, plots and comparisons built from small JSON files."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import AxesImage

from evaluation import report
from tests.helpers import assert_drawn_png, parse_markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REASON = "learned absolute positions stop at l_max=128; length 256 has no position embedding"


def result_dict(lengths=(32, 64, 128), not_evaluable=None, **extra):
    """A perplexity_by_length dict with perplexity 10, 9, 8, ... over `lengths`."""
    n = len(lengths)
    result = {"name": "", "step": 100, "l_max": 64, "position": "rope", "rope_scaling": None,
              "lengths": list(lengths), "perplexity": [10.0 - i for i in range(n)],
              "loss": [float(np.log(10.0 - i)) for i in range(n)],
              "target_tokens": [512] * n, "unigram_perplexity": [30.0] * n,
              "not_evaluable": dict(not_evaluable or {})}
    result.update(extra)
    return result


def retrieval_dict(lengths=(32, 64, 128), depths=(0.0, 0.5, 1.0)):
    """A retrieval.json dict of one task whose accuracy[length i][depth j] = (i + j) / 10."""
    accuracy = [[(i + j) / 10 for j in range(len(depths))] for i in range(len(lengths))]
    grid = {"task": "passkey", "lengths": list(lengths), "depths": list(depths),
            "accuracy": accuracy, "mean_answer_logprob": accuracy, "samples_per_cell": 4,
            "k_max": lengths[0], "threshold": 0.1,
            "length_accuracy": [float(np.mean(r)) for r in accuracy],
            "depth_accuracy": [float(v) for v in np.mean(accuracy, axis=0)]}
    return {"threshold": 0.1, "tasks": {"passkey": grid}}


def write_result(eval_dir, result, retrieval=None):
    os.makedirs(eval_dir, exist_ok=True)
    with open(os.path.join(eval_dir, "perplexity_by_length.json"), "w") as f:
        json.dump(result, f)
    if retrieval is not None:
        with open(os.path.join(eval_dir, "retrieval.json"), "w") as f:
            json.dump(retrieval, f)
    return str(eval_dir)


def line(fig, gid):
    """The one Line2D of `fig`'s first axes with this gid."""
    found = [drawn for drawn in fig.axes[0].get_lines() if drawn.get_gid() == gid]
    assert len(found) == 1, [drawn.get_gid() for drawn in fig.axes[0].get_lines()]
    return found[0]


def table_row(markdown, first_cell):
    """The cells of the markdown table row whose first cell is `first_cell`."""
    for text in markdown.splitlines():
        cells = [c.strip() for c in text.strip().strip("|").split("|")]
        if text.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{markdown}")


# ------------------------------------------------------------------ summary
def test_summary_has_every_length_and_the_not_evaluable_reason(tmp_path):
    eval_dir = write_result(tmp_path / "eval", result_dict(not_evaluable={"256": REASON}))
    markdown = report.write_summary(eval_dir)
    assert open(os.path.join(eval_dir, "summary.md")).read() == markdown
    assert table_row(markdown, "32")[1:3] == [f"{np.log(10.0):.4f}", "10.000"]   # loss, ppl
    assert table_row(markdown, "64")[2] == "9.000"
    assert table_row(markdown, "128")[2] == "8.000"
    assert table_row(markdown, "256")[1:] == [f"not evaluable: {REASON}", "", "", "", ""]


def test_summary_shows_sliding_window_and_unigram_columns(tmp_path):
    sliding = {"stride": 16, "lengths": [32, 64], "perplexity": [7.5, 6.25],
               "target_tokens": [100, 100]}
    eval_dir = write_result(tmp_path / "eval", result_dict(sliding_window=sliding))
    markdown = report.write_summary(eval_dir)
    assert table_row(markdown, "length") == ["length", "loss", "perplexity",
                                             "sliding-window perplexity", "unigram baseline",
                                             "target tokens"]
    assert table_row(markdown, "64") == ["64", f"{np.log(9.0):.4f}", "9.000", "6.250", "30.000",
                                         "512"]
    assert table_row(markdown, "128")[3] == ""


def test_summary_has_loss_by_position_buckets(tmp_path):
    buckets = {"length": 8, "bucket_start": [1, 2, 4, 8], "bucket_end": [2, 4, 8, 9],
               "loss": [3.0, 2.5, 2.0, 1.5], "tokens": [4, 8, 16, 4]}
    eval_dir = write_result(tmp_path / "eval", result_dict(loss_by_position=buckets))
    markdown = report.write_summary(eval_dir)
    assert table_row(markdown, "[4, 8)")[1] == "2.0000"
    assert table_row(markdown, "[8, 9)")[3] == "4"


def test_summary_has_retrieval_table_and_k_max(tmp_path):
    eval_dir = write_result(tmp_path / "eval", result_dict(), retrieval_dict())
    markdown = report.write_summary(eval_dir)
    assert "### passkey" in markdown and "k_max = 32" in markdown
    assert table_row(markdown, "depth \\ length")[1:4] == ["32", "64", "128"]
    # depth 50% (j = 1) at length 128 (i = 2): (2 + 1) / 10
    assert table_row(markdown, "50%")[3] == "0.30"


def test_summary_of_missing_results_raises(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        report.write_summary(str(tmp_path))


# ------------------------------------------------------------------ perplexity plot
def test_not_evaluable_lengths_are_not_on_the_line(tmp_path):
    curve = result_dict(lengths=(32, 64), not_evaluable={"128": REASON, "256": REASON})
    fig = report.perplexity_figure([curve])
    label = report.curve_label(curve)
    assert list(line(fig, f"perplexity:{label}").get_xdata()) == [32, 64]
    assert list(line(fig, f"perplexity:{label}").get_ydata()) == [10.0, 9.0]


def test_not_evaluable_lengths_are_x_markers_at_the_top_edge():
    curve = result_dict(lengths=(32, 64), not_evaluable={"128": REASON})
    fig = report.perplexity_figure([curve])
    marker = line(fig, f"not_evaluable:{report.curve_label(curve)}")
    assert marker.get_marker() == "x"
    assert list(marker.get_xdata()) == [128]
    # y is in axes coordinates (top edge), not a perplexity value
    assert marker.get_transform() == fig.axes[0].get_xaxis_transform()
    assert "not evaluable" in " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_sliding_window_is_dotted_in_the_curve_colour():
    sliding = {"stride": 16, "lengths": [32, 64], "perplexity": [7.5, 6.25],
               "target_tokens": [100, 100]}
    curve = result_dict(sliding_window=sliding)
    fig = report.perplexity_figure([curve])
    label = report.curve_label(curve)
    main, dotted = line(fig, f"perplexity:{label}"), line(fig, f"sliding:{label}")
    assert dotted.get_linestyle() == ":"
    assert dotted.get_color() == main.get_color()
    assert dotted.get_label() == f"{label} (sliding)"


def test_equal_l_max_gives_one_vertical_line():
    curves = [result_dict(name="a", l_max=64), result_dict(name="b", l_max=64),
              result_dict(name="c", l_max=128)]
    fig = report.perplexity_figure(curves)
    gids = sorted(line.get_gid() for line in fig.axes[0].get_lines()
                  if (line.get_gid() or "").startswith("l_max:"))
    assert gids == ["l_max:128", "l_max:64"]


def test_x_axis_is_log2_with_ticks_at_the_lengths():
    fig = report.perplexity_figure([result_dict(not_evaluable={"256": REASON})])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == [32, 64, 128, 256]


@pytest.mark.parametrize("perplexity, scale", [([10.0, 9.0, 8.0], "linear"),
                                               ([500.0, 40.0, 20.0], "log")])
def test_y_axis_is_log_only_for_a_range_over_10x(perplexity, scale):
    fig = report.perplexity_figure([result_dict(perplexity=perplexity)])
    assert fig.axes[0].get_yscale() == scale


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "out" / "ppl.png"
    report.plot_perplexity_by_length([result_dict()], str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_drawn_png(path)


def test_curve_label_uses_name_or_workdir_and_scaling():
    scaling = {"rope_type": "linear", "factor": 4.0}
    assert report.curve_label(result_dict(name="tiny", rope_scaling=scaling)) == "tiny / linear x4"
    assert report.curve_label(result_dict(workdir="/runs/base/")) == "base"
    assert report.curve_label(result_dict(name="abs", position="learned")) == \
        "abs / learned positions"


# ------------------------------------------------------------------ retrieval heatmap
def test_heatmap_is_written_with_depth_rows_and_length_columns(tmp_path):
    retrieval = retrieval_dict(lengths=(32, 64, 128, 256), depths=(0.0, 0.5, 1.0))
    path = tmp_path / "retrieval.png"
    report.plot_retrieval_heatmap(retrieval, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = report.retrieval_figure(retrieval)
    images = [a for ax in fig.axes for a in ax.get_images() if isinstance(a, AxesImage)]
    assert len(images) == 1
    data = np.asarray(images[0].get_array())
    assert data.shape == (3, 4)                       # depths x lengths
    assert data[1, 3] == pytest.approx((3 + 1) / 10)  # depth 50%, length 256
    assert images[0].get_clim() == (0.0, 1.0)
    assert "k_max = 32" in fig.axes[0].get_title()


def test_write_plots_returns_both_pngs(tmp_path):
    eval_dir = write_result(tmp_path / "eval", result_dict(), retrieval_dict())
    paths = report.write_plots(eval_dir)
    assert paths == [os.path.join(eval_dir, "perplexity_by_length.png"),
                     os.path.join(eval_dir, "retrieval.png")]
    for path in paths:
        assert_drawn_png(path)


def test_write_plots_draws_the_curve_its_unigram_baseline_and_l_max(tmp_path, monkeypatch):
    eval_dir = write_result(tmp_path / "eval", result_dict(name="tiny"))
    saved = {}
    save = report._save

    def keep(fig, path):
        saved[os.path.basename(path)] = fig
        save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    report.write_plots(eval_dir)
    fig = saved["perplexity_by_length.png"]
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xlabel() == "context length (tokens)" and ax.get_ylabel() == "perplexity"
    assert ax.get_title() == "Perplexity by context length: tiny (step 100)"
    assert sorted(drawn.get_gid() for drawn in ax.get_lines()) == ["l_max:64",
                                                                   "perplexity:tiny", "unigram"]
    assert list(line(fig, "unigram").get_ydata()) == [30.0, 30.0, 30.0]


# ------------------------------------------------------------------ find_results / compare
def test_find_results_finds_eval_and_named_subdirectories(tmp_path):
    write_result(tmp_path / "eval" / "yarn", result_dict(name="yarn"))
    write_result(tmp_path / "eval", result_dict(name=""))
    write_result(tmp_path / "eval" / "linear", result_dict(name="linear"))
    results = report.find_results(str(tmp_path))
    assert [r["name"] for r in results] == ["", "linear", "yarn"]
    assert results[1]["eval_dir"] == str(tmp_path / "eval" / "linear")


def test_compare_has_union_of_lengths_with_blanks_and_not_evaluable(tmp_path):
    write_result(tmp_path / "a" / "eval", result_dict(lengths=(32, 64)))
    write_result(tmp_path / "b" / "eval",
                 result_dict(lengths=(64, 128), not_evaluable={"256": REASON}))
    out = tmp_path / "out"
    markdown = report.compare([str(tmp_path / "a"), str(tmp_path / "b")], str(out))
    assert (out / "compare.md").read_text() == markdown
    assert_drawn_png(out / "compare_perplexity.png")
    assert table_row(markdown, "run") == ["run", "l_max", "32", "64", "128", "256"]
    assert table_row(markdown, "a") == ["a", "64", "10.000", "9.000", "", ""]
    assert table_row(markdown, "b") == ["b", "64", "", "10.000", "9.000", "n/e"]


def test_compare_without_out_dir_returns_the_table_and_writes_nothing(tmp_path):
    write_result(tmp_path / "a" / "eval", result_dict(lengths=(32, 64)))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    markdown = report.compare([str(tmp_path / "a")])
    assert table_row(markdown, "a") == ["a", "64", "10.000", "9.000"]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_compare_plots_every_result_on_one_axes(tmp_path):
    write_result(tmp_path / "a" / "eval", result_dict(lengths=(32, 64)))
    write_result(tmp_path / "a" / "eval" / "x4", result_dict(name="x4"))
    write_result(tmp_path / "b" / "eval", result_dict())
    results = report.find_results(str(tmp_path / "a")) + report.find_results(str(tmp_path / "b"))
    fig = report.perplexity_figure(results)
    assert len(fig.axes) == 1
    gids = sorted(line.get_gid() for line in fig.axes[0].get_lines()
                  if line.get_gid().startswith("perplexity:"))
    assert gids == ["perplexity:a", "perplexity:b", "perplexity:x4"]


def test_same_labels_from_different_workdirs_are_made_unique(tmp_path):
    write_result(tmp_path / "a" / "eval" / "ext", result_dict(name="ext"))
    write_result(tmp_path / "b" / "eval" / "ext", result_dict(name="ext"))
    results = report.find_results(str(tmp_path / "a")) + report.find_results(str(tmp_path / "b"))
    assert report.unique_labels(results) == ["a: ext", "b: ext"]


def test_compare_on_a_missing_workdir_raises(tmp_path):
    write_result(tmp_path / "a" / "eval", result_dict())
    with pytest.raises(ValueError, match="does not exist"):
        report.compare([str(tmp_path / "a"), str(tmp_path / "missing")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_compare_on_a_workdir_without_results_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        report.compare([str(tmp_path / "empty")], str(tmp_path / "out"))


def files_under(directory):
    return sorted(os.path.relpath(os.path.join(d, name), directory)
                  for d, _, names in os.walk(directory) for name in names)


def test_main_compare_mode_writes_one_plot_and_one_table(tmp_path):
    for name, lengths in (("a", [64, 128]), ("b", [64, 256])):
        eval_dir = tmp_path / name / "eval"
        eval_dir.mkdir(parents=True)
        (eval_dir / "perplexity_by_length.json").write_text(json.dumps(
            {"name": "", "l_max": 64, "position": "rope", "rope_scaling": None, "lengths": lengths,
             "perplexity": [5.0, 6.0], "loss": [1.6, 1.8], "target_tokens": [10, 10],
             "unigram_perplexity": [20.0, 20.0], "not_evaluable": {}}))
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, "main.py", "--mode", "compare", "--workdirs",
                             f"{tmp_path / 'a'},{tmp_path / 'b'}", "--workdir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["compare.md", "compare_perplexity.png"]
    table = (out / "compare.md").read_text()
    assert table_row(table, "run") == ["run", "l_max", "64", "128", "256"]
    assert table_row(table, "a") == ["a", "64", "5.000", "6.000", ""]
    assert table_row(table, "b") == ["b", "64", "5.000", "", "6.000"]
    assert table in result.stdout


@pytest.mark.slow      # the shared trained workdir
def test_main_compare_mode_without_workdir_prints_the_table_and_writes_nothing(
        trained_workdir, tmp_path):
    before = files_under(trained_workdir)
    result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--mode", "compare",
                             "--workdirs", str(trained_workdir)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    header, rows = parse_markdown_table(result.stdout.splitlines())
    assert header[:2] == ["run", "l_max"]       # other tests may add evaluations, lengths
    (row,) = [row for row in rows if row[0] == "run"]      # eval/ of the workdir "run"
    perplexity = trained_workdir.summary["eval"]["perplexity"][0]
    assert row[1] == "64" and row[header.index("64")] == f"{perplexity:.3f}"
    assert "wrote" not in result.stdout
    assert os.listdir(tmp_path) == []              # no compare/ (nor anything else) here
    assert files_under(trained_workdir) == before
