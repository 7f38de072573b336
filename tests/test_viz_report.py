"""Figures, offline circuitsvis views and the HTML report, the report checked in headless Chromium.

The browser test opens the report from disk and requires: every figure decoded and painted, every
circuitsvis view rendered into DOM content, no console error, and no network request other than
the report file itself and data: URIs (read from the DevTools Protocol's Network events). A
control page proves those two detectors do catch an error and a request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from mechcopy import viz
from mechcopy.hooks import capture
from mechcopy.report import Section, render_report, write_report
from mechcopy.neurons import NeuronSet, model_fingerprint
from mechcopy.sites import neuron_site

TEXT = "hot -> cold\nbig -> small\nfast ->"


# --------------------------------------------------------------------------- synthetic data


def _n_colors(image) -> int:
    rgb = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.int32)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def task_df(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("antonyms", "country_capital", "next_letter"):
        for cond in ("unpruned", "pruned", "random-0", "random-1", "random-2", "bottom"):
            acc, cr = rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.5)
            rows.append(dict(task=task, condition=cond, family="random" if cond.startswith("random") else cond,
                             accuracy=acc, accuracy_lo=acc - 0.05,
                             accuracy_hi=min(1, acc + 0.05), copy_rate=cr, copy_rate_lo=max(0, cr - 0.04),
                             copy_rate_hi=cr + 0.04))
    return pd.DataFrame(rows)


def k_df() -> pd.DataFrame:
    ks = [0, 5, 10, 20, 50, 100, 200]
    return pd.DataFrame(dict(k=ks, dev_accuracy=np.linspace(0.1, 0.5, 7), dev_copy_rate=np.linspace(0.8, 0.3, 7),
                             ppl_increase=np.linspace(0, 0.08, 7)))


def tv_df() -> pd.DataFrame:
    rows = [dict(layer=l, task=t, condition=c, accuracy=(l / 10 + 0.05 * j + (0.1 if c == "pruned" else 0)) % 1)
            for l in range(10) for j, t in enumerate(("antonyms", "next_letter")) for c in ("unpruned", "pruned")]
    return pd.DataFrame(rows)


def all_figures() -> dict[str, Figure]:
    heat = np.sin(np.arange(40).reshape(5, 8) / 3.0)
    return {
        "task_bars": viz.plot_task_bars(task_df()),
        "k_sweep": viz.plot_k_sweep(k_df(), chosen_k=50),
        "layers": viz.plot_layer_distribution([0, 3, 5, 1, 0, 9]),
        "tv_by_layer": viz.plot_tv_by_layer(tv_df()),
        "patching": viz.plot_patching_heatmap(heat, ["<bos>", "hot", " ->", " $x", "\n", "big", " ->", "?"], "patch"),
        "loss": viz.plot_loss_curve(np.arange(100), 5 * np.exp(-np.arange(100) / 20) + 0.1),
        "loss_and_evals": viz.plot_loss_curve(np.arange(100), {"all": np.linspace(3, 1, 100), "query": np.linspace(4, 2, 100)},
                                              evals={"map": ([50, 100], [0.2, 0.6])}, smooth=5),
    }


@pytest.fixture(scope="module")
def tiny_neurons(tiny):
    return NeuronSet(((0, 3), (0, 17), (1, 5), (1, 60)), model_fingerprint(tiny), {"name": "test set"})


# --------------------------------------------------------------------------- figures


def test_figures_save_as_png(tmp_path):
    from PIL import Image

    for name, fig in all_figures().items():
        assert isinstance(fig, Figure)
        path = viz.save_figure(fig, tmp_path / f"{name}.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
            assert _n_colors(im.convert("RGB")) > 20, f"{name} looks blank"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.png" for n in all_figures())  # no temp files


def test_loss_curve_smooths_with_a_trailing_mean():
    rng = np.random.default_rng(0)
    loss = rng.random(50)
    fig = viz.plot_loss_curve(np.arange(50), {"a": loss}, smooth=7, evals={"acc": ([10, 50], [0.1, 0.5])})
    drawn = fig.axes[0].lines[0].get_ydata()
    naive = [loss[max(0, i - 6): i + 1].mean() for i in range(50)]
    assert np.allclose(drawn, naive) and list(fig.axes[1].lines[0].get_ydata()) == [0.1, 0.5]
    with pytest.raises(ValueError, match="equal-length"):
        viz.plot_loss_curve(np.arange(5), np.arange(4))


def test_task_bars_draw_the_data():
    df = task_df()
    fig = viz.plot_task_bars(df)
    acc_ax, copy_ax = fig.axes[:2]
    fams = ["unpruned", "pruned", "random", "bottom"]
    tasks = list(dict.fromkeys(df["task"]))
    heights = np.array([p.get_width() for p in acc_ax.patches]).reshape(len(fams), len(tasks))   # horizontal bars
    for i, fam in enumerate(fams):
        for j, task in enumerate(tasks):
            sub = df[(df.task == task) & (df.condition.str.startswith(fam))]
            assert heights[i, j] == pytest.approx(sub.accuracy.mean())  # random: the mean over seeds
    copies = np.array([p.get_width() for p in copy_ax.patches]).reshape(len(fams), len(tasks))
    assert copies[1, 0] == pytest.approx(df[(df.task == tasks[0]) & (df.condition == "pruned")].copy_rate.item())
    agg = viz.aggregate_conditions(df).set_index(["task", "condition"])
    seeds = df[(df.task == "antonyms") & df.condition.str.startswith("random")]
    assert agg.loc[("antonyms", "random"), "accuracy_lo"] == pytest.approx(seeds.accuracy.min())
    assert agg.loc[("antonyms", "random"), "accuracy_hi"] == pytest.approx(seeds.accuracy.max())
    assert agg.loc[("antonyms", "pruned"), "accuracy_hi"] == pytest.approx(
        df[(df.task == "antonyms") & (df.condition == "pruned")].accuracy_hi.item())
    with pytest.raises(ValueError, match="copy_rate_hi"):
        viz.plot_task_bars(df.drop(columns="copy_rate_hi"))


def test_task_bars_read_at_page_width_for_every_task():
    """27 tasks x 4 condition families: one row per task, at most the report's width (10 in at 110 dpi,
    the page's 1100 px), the figure growing down, not across."""
    rng = np.random.default_rng(1)
    rows = []
    for t in range(27):
        for fam in ("unpruned", "pruned", "random", "bottom"):
            acc, cr = rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.5)
            rows.append(dict(task=f"task_{t}", condition=fam, family=fam, accuracy=acc, accuracy_lo=acc - 0.05,
                             accuracy_hi=acc + 0.05, copy_rate=cr, copy_rate_lo=cr, copy_rate_hi=cr + 0.04))
    fig = viz.plot_task_bars(pd.DataFrame(rows))
    width, height = fig.get_size_inches()
    assert width * viz.DPI <= 1100 and height > width
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [f"task_{t}" for t in range(27)]
    assert len(fig.axes[0].patches) == 27 * 4


def test_task_vector_table_says_when_no_layer_works():
    """A task whose task vector gets no dev prompt right at any layer has no best layer: the report says
    "none works" instead of "best layer 0, test 0"."""
    from mechcopy.report import _task_vectors
    from mechcopy.task_vectors import TaskVectorResult

    def result(dev, test):
        best = 2 * max(range(3), key=lambda i: dev[i])
        return TaskVectorResult("t", "unpruned", (0, 2, 4), dev, best, test, (0.0, 1.0), 0.1, 0.0, 0.5, 0.1, 3, 4, 0,
                                ("a",) * 4)

    works, fails = result((0.0, 0.6666666, 0.3333), 0.75), result((0.0, 0.0, 0.0), 0.0)
    assert works.any_layer_works and not fails.any_layer_works
    table = _task_vectors([works, fails], Path(tempfile.mkdtemp())).table
    assert list(table["best layer"]) == [2, "none works"] and list(table["test accuracy"]) == ["0.750", "–"]


def test_task_results_df_reads_results():
    from types import SimpleNamespace

    d = dict(task="t", condition="pruned", n=10, accuracy=0.3, copy_rate=0.5, copy_share_of_errors=0.7,
             other_rate=0.2, accuracy_ci=[0.1, 0.5], copy_rate_ci=[0.3, 0.7], predictions=["a"] * 10)
    obj = SimpleNamespace(to_json=lambda: d)
    df = viz.task_results_df([d, obj])
    assert list(df.iloc[0][["accuracy_lo", "accuracy_hi", "copy_rate_lo", "copy_rate_hi"]]) == [0.1, 0.5, 0.3, 0.7]
    assert df.iloc[1].to_dict() == df.iloc[0].to_dict()
    viz.plot_task_bars(df)


def test_heatmap_and_curves_show_their_values():
    values = np.random.default_rng(0).normal(size=(4, 6))
    fig = viz.plot_patching_heatmap(torch.tensor(values), list("abcdef"), "t")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), values)
    lo, hi = fig.axes[0].images[0].get_clim()
    assert lo == pytest.approx(-np.abs(values).max()) and hi == pytest.approx(np.abs(values).max())
    with pytest.raises(ValueError, match="token labels"):
        viz.plot_patching_heatmap(values, list("abc"), "t")
    fig = viz.plot_k_sweep(k_df().assign(chosen=lambda d: d.k == 20))
    assert any(list(l.get_xdata()) == [20, 20] for l in fig.axes[0].lines)  # the chosen-k marker
    fig = viz.plot_layer_distribution([2, 0, 7])
    assert [p.get_height() for p in fig.axes[0].patches] == [2, 0, 7]


# --------------------------------------------------------------------------- circuitsvis views


def test_attention_view_matches_the_pattern(tiny):
    view = viz.attention_view(tiny, TEXT, layer=1)
    store: dict = {}
    tiny.run_with_hooks(TEXT, fwd_hooks=[("blocks.1.attn.hook_pattern", capture(store))])
    props = viz.to_json_props(view)
    np.testing.assert_allclose(np.array(props["attention"]), store["blocks.1.attn.hook_pattern"][0].numpy(), atol=1e-4)
    assert props["tokens"] == tiny.to_str_tokens(TEXT)
    assert props["attentionHeadNames"] == [f"L1H{h}" for h in range(tiny.cfg.n_heads)]
    assert "http" not in view.local_src.split("<script", 1)[0]
    same = lambda h: re.sub(r"circuits-vis-\w+", "ID", h)  # each render gets its own div id
    assert same(view._repr_html_()) == same(view.local_src) and view.local_src.count("var CircuitsVis=") == 1
    with pytest.raises(IndexError):
        viz.attention_view(tiny, TEXT, layer=2)


def test_neuron_view_matches_the_sites(tiny, tiny_neurons, tmp_path):
    view = viz.neuron_activations_view(tiny, TEXT, tiny_neurons)
    props = viz.to_json_props(view)
    store: dict = {}
    tiny.run_with_hooks(TEXT, fwd_hooks=[(neuron_site(tiny, l), capture(store)) for l in (0, 1)])
    expected = torch.stack([store[neuron_site(tiny, l)][0, :, i] for l, i in tiny_neurons.neurons], dim=-1)
    np.testing.assert_allclose(np.array(props["activations"])[:, 0, :], expected.numpy(), atol=1e-4)
    assert props["secondDimensionLabels"] == ["L0N3", "L0N17", "L1N5", "L1N60"]
    top2 = viz.to_json_props(viz.neuron_activations_view(tiny, TEXT, tiny_neurons, max_neurons=2))
    strongest = sorted(expected.abs().amax(0).topk(2).indices.tolist())
    assert top2["secondDimensionLabels"] == [props["secondDimensionLabels"][i] for i in strongest]
    saved = view.save(tmp_path / "v.html")
    assert saved.read_text().startswith("<!DOCTYPE html>")
    other = NeuronSet(((0, 1),), {**model_fingerprint(tiny), "n_layers": 9})
    with pytest.raises(ValueError, match="another model"):
        viz.neuron_activations_view(tiny, TEXT, other)


class _Kernel:
    """What a view sees of a Jupyter kernel: the shell's class name and the request it answers."""

    def __init__(self):
        self.parent_header = {}

    def run(self, cell, n):
        self.parent_header = {"header": {"msg_id": f"run-{n}"}, "metadata": {"cellId": cell} if cell else {}}


@pytest.fixture
def kernel(monkeypatch):
    import sys
    import types

    shell = type("ZMQInteractiveShell", (_Kernel,), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    viz.reset_notebook_script()
    yield shell
    viz.reset_notebook_script()


def test_notebook_views_share_one_script(tiny, kernel):
    """In a kernel the first view defines circuitsvis' script for the page; later views only render,
    except the defining cell when it runs again (its output is replaced). Outside a kernel: local_src."""
    lib = viz.circuitsvis_library()
    view = viz.attention_view(tiny, TEXT, layer=0)
    shown = []
    for cell, n in [("a", 1), ("a", 1), ("b", 2), ("a", 3), ("c", 4)]:   # cell a shows two views, b one...
        kernel.run(cell, n)
        shown.append(view._repr_html_())
    assert [lib in h for h in shown] == [True, False, False, True, False]
    first = shown[0]
    assert first.count("</script>") == 1 and 'type="module"' not in first   # global: later outputs use it
    assert all("window.CircuitsVis" in h and len(h) < len(first) - len(lib) + 1000 for h in shown[1:3] + shown[4:])
    kernel.run(None, 5)                 # a front end that does not say which cell runs (nbclient)
    assert lib not in view._repr_html_()
    viz.reset_notebook_script()
    assert lib in view._repr_html_()
    import sys

    sys.modules["google.colab"] = object()   # Colab: every output is its own frame
    try:
        assert view._repr_html_().count(lib) == 1 and 'type="module"' in view._repr_html_()
    finally:
        del sys.modules["google.colab"]


# --------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def report(tiny, tiny_neurons, tmp_path_factory):
    """A report with every figure kind, both views, circuitsvis' own local_src, a table and meta."""
    import circuitsvis

    folder = tmp_path_factory.mktemp("report")
    figs = {name: viz.save_figure(fig, folder / f"{name}.png") for name, fig in all_figures().items()}
    native = circuitsvis.tokens.colored_tokens(["a", "b", "c"], [0.1, -0.5, 0.9]).local_src
    sections = [
        Section("Tasks", "Accuracy and **copy rate**.\n\n- one\n- two `code`", [figs["task_bars"]],
                table=task_df().round(3)),
        Section("Choosing k", "Dev split only.", [figs["k_sweep"], figs["layers"]]),
        Section("Task vectors", "", [figs["tv_by_layer"], figs["patching"]]),
        Section("Organism", "Loss.", [figs["loss"], figs["loss_and_evals"]]),
        Section("Views", "Attention and neurons <b>escaped</b>.",
                html=[viz.attention_view(tiny, TEXT, 0), viz.neuron_activations_view(tiny, TEXT, tiny_neurons),
                      native]),
    ]
    meta = {"model": model_fingerprint(tiny), "git": "abc123", "settings": {"k": 50, "seed": 0}}
    path = write_report(folder / "report.html", "mechcopy test report", sections, meta)
    return path, len(figs), 3


def test_report_is_one_offline_file(report):
    path, n_figures, n_views = report
    text = path.read_text()
    assert text.count("<img ") == n_figures and text.count('src="data:image/png;base64,') == n_figures
    assert text.count("var CircuitsVis=") == 1  # the script once, however many views
    assert text.count("CircuitsVis.render(") == n_views
    assert "sourceMappingURL" not in text and "unpkg.com" not in text
    # No attribute anywhere loads a resource from elsewhere (the script's own string constants aside).
    assert not re.search(r"""(src|href|action|srcset)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text and "<strong>copy rate</strong>" in text
    assert "abc123" in text and "weight_hash" in text
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="CDN"):
        import circuitsvis

        render_report("x", [Section("v", html=[str(circuitsvis.tokens.colored_tokens(["a"], [1.0]))])])
    with pytest.raises(FileNotFoundError, match="save it first"):
        render_report("x", [Section("f", figures=[path.parent / "missing.png"])])


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions",
                  "--window-size=1280,900"]


def _browser_paths() -> tuple[str, str] | None:
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    paths = _browser_paths()
    msg = ("headless Chromium is needed for the report test: install it with "
           "`apt-get install -y chromium chromium-driver` (.ci/run does this)")
    if paths is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("selenium is missing: pip install -e '.[dev]'")
        pytest.skip("selenium is missing: pip install -e '.[dev]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _screenshot(driver):
    from PIL import Image

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def _wait_for_views(driver, n_views: int) -> None:
    """circuitsvis renders with React after load: wait until each of the `n_views` div.view holds DOM content."""
    count_js = """return Array.from(document.querySelectorAll('div.view')).map(v =>
        Array.from(v.querySelectorAll('*')).filter(e => e.tagName !== 'SCRIPT').length);"""
    deadline = time.time() + 30
    while time.time() < deadline:
        counts = driver.execute_script(count_js)
        if len(counts) == n_views and all(c > 3 for c in counts):
            break
        time.sleep(0.25)
    assert len(counts) == n_views and all(c > 3 for c in counts), f"circuitsvis views did not render: {counts}"


def test_browser_detectors_catch_errors_and_requests(browser, tmp_path):
    """Control: a page that logs an error and fetches from the network must trip both detectors."""
    page = tmp_path / "control.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("control error")</script></body></html>')
    _open(browser, page)
    time.sleep(0.5)
    assert any("control error" in m for m in _console_errors(browser))
    assert "http://127.0.0.1:9/x.png" in _requests(browser)


def test_notebook_page_renders_every_view_from_one_script(browser, tiny, tiny_neurons, tmp_path):
    """Outputs as a notebook page holds them: the first view defines the script, the second only renders."""
    views = [viz.attention_view(tiny, TEXT, 0), viz.neuron_activations_view(tiny, TEXT, tiny_neurons)]
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    + "".join(f'<div class="view">{v.page_snippet(i == 0)}</div>' for i, v in enumerate(views))
                    + "</body></html>")
    assert page.read_text().count("var CircuitsVis=") == 1
    _open(browser, page)
    _wait_for_views(browser, 2)
    assert "hot" in browser.execute_script("return document.querySelectorAll('div.view')[1].innerText")
    assert _console_errors(browser) == []


def test_report_renders_offline_in_chromium(browser, report, tmp_path):
    path, n_figures, n_views = report
    _open(browser, path)
    _wait_for_views(browser, n_views)
    heights = browser.execute_script(
        "return Array.from(document.querySelectorAll('div.view')).map(v => v.getBoundingClientRect().height)")
    assert all(h > 30 for h in heights), heights
    text = browser.execute_script("return document.querySelectorAll('div.view')[1].innerText")
    assert "hot" in text, text  # the neuron view shows the prompt's tokens
    imgs = browser.execute_script("""return Array.from(document.images).map(i => {
        const r = i.getBoundingClientRect();
        return [i.complete, i.naturalWidth, r.x + window.scrollX, r.y + window.scrollY, r.width, r.height];});""")
    assert len(imgs) == n_figures
    assert all(done and width > 0 for done, width, *_ in imgs), imgs

    errors, requests = _console_errors(browser), _requests(browser)
    assert errors == [], f"console errors: {errors}"
    foreign = [u for u in requests if not (u == path.resolve().as_uri() or u.startswith("data:"))]
    assert foreign == [], f"the report made network requests: {foreign}"

    shot = _screenshot(browser)
    shot.save(tmp_path / "report.png")
    assert shot.height > 2000 and _n_colors(shot) > 500, "the screenshot looks blank"
    for done, width, x, y, w, h in imgs:  # each figure is painted: its screen region is not blank
        region = shot.crop((int(x), int(y), int(x + w), int(y + h)))
        assert _n_colors(region) > 20, f"figure at y={y} not painted"


def test_forest_plot_draws_every_task_and_the_pooled_difference():
    from tests.test_evaluation import _fake_rows

    from mechcopy.comparisons import compare_rows

    comps = compare_rows(_fake_rows(), n_boot=200)
    fig = viz.plot_forest(comps)
    axes = fig.axes
    assert len(axes) == 4   # (accuracy, copy rate) x (pruned - unpruned, pruned - random)
    ax = axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "pooled" or labels[0] == "pooled"
    pooled = next(c for c in comps["pooled"] if (c.condition, c.baseline, c.metric) == ("pruned", "unpruned", "accuracy"))
    xs = [line.get_xdata()[0] for line in ax.lines if len(line.get_xdata()) == 1]
    assert any(abs(x - pooled.diff) < 1e-12 for x in xs)
    assert f"{pooled.diff:+.3f}" in ax.get_title() and f"MDE {pooled.mde:.3f}" in ax.get_title()
    with pytest.raises(ValueError):
        viz.plot_forest({})


def test_report_answer_gives_the_task_level_figures_beside_the_pooled_ones(tiny, tiny_neurons, tmp_path):
    """Issue 25 item 5: the report's headline shows, for every pooled comparison it states, the same
    comparison with the task as the unit (`comparisons.task_levels`), and says which claim rests on which."""
    from tests.test_evaluation import _fake_rows

    from mechcopy.comparisons import Evaluation, compare_rows, task_levels
    from mechcopy.report import _answer

    rows = _fake_rows()
    comps = compare_rows(rows, n_boot=200)
    levels = task_levels(comps, seed=0)
    text = _answer(Evaluation(tuple(rows), {}, comps, tuple(levels)), tiny_neurons, tmp_path).text
    over = {(t.condition, t.baseline, t.metric): t for t in levels}
    for c in comps["pooled"]:
        key = (c.condition, c.baseline, c.metric)
        if key[:2] not in viz.FOREST_PAIRS:
            continue
        lo, hi = over[key].ci
        line = next(l for l in text.splitlines() if l.startswith(f"- {c.metric.replace('_', ' ')} "
                                                                   f"{key[0]} - {key[1]}:"))
        assert f"{c.diff:+.3f} [95% CI {c.ci[0]:+.3f}, {c.ci[1]:+.3f}]" in line
        assert (f"Over tasks: {over[key].mean:+.3f} [t interval {lo:+.3f}, {hi:+.3f}], "
                f"p = {over[key].p_value:.3g}") in line
        assert f"sign test p = {over[key].sign_p:.3g}" in line
    assert "a claim that pruning helps tasks like these rests on it" in text
    no_levels = _answer(Evaluation(tuple(rows), {}, comps), tiny_neurons, tmp_path).text
    assert "Over tasks: " not in no_levels   # no levels given: none shown


def test_k_curve_plot_draws_each_k_and_pair():
    from tests.test_evaluation import _fake_rows

    from mechcopy.comparisons import compare_rows

    pooled = compare_rows(_fake_rows(), n_boot=200)["pooled"]
    # two ks with the same comparisons, the second shifted by +0.1, to tell them apart on the plot
    curve = {5: pooled, 50: [replace(c, diff=c.diff + 0.1, ci=(c.ci[0] + 0.1, c.ci[1] + 0.1)) for c in pooled]}
    fig = viz.plot_k_curve(curve, chosen_k=5)
    assert len(fig.axes) == 2   # accuracy, copy rate
    ax = fig.axes[0]
    acc = {(c.condition, c.baseline): c.diff for c in pooled if c.metric == "accuracy"}
    points = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if len(line.get_xdata()) == 1]
    ys = sorted(round(y, 9) for _, y in points)
    assert ys == sorted(round(d + s, 9) for d in (acc[("pruned", "unpruned")], acc[("pruned", "random")])
                        for s in (0.0, 0.1))
    assert {t.get_text() for t in ax.get_xticklabels()} == {"5", "50"}
    assert any(line.get_linestyle() == ":" for line in ax.lines)   # the chosen k
    with pytest.raises(ValueError):
        viz.plot_k_curve({})


def test_k_curve_plot_says_when_no_pruning_was_chosen():
    from tests.test_evaluation import _fake_rows

    from mechcopy.comparisons import compare_rows

    fig = viz.plot_k_curve({"5": compare_rows(_fake_rows(), n_boot=100)["pooled"]}, chosen_k=0, title="t")
    assert fig._suptitle.get_text() == "t\nthe dev split chose k = 0: no pruning"


def _study_files(root: Path, beats: bool) -> None:
    """A hand-made copy-mechanism study summary and criteria for the model `m` under root/docs/data."""
    cell = lambda d: {"diff": d, "task_ci": [d - 0.1, d + 0.1]}
    row = lambda a, c, e, ppl=0.0: {"accuracy": cell(a), "copy_rate": cell(c), "copy_effect": cell(e), "ppl_increase": ppl}
    table = {"batch": row(0.02, -0.01, 0.0), "contextual": row(0.2, -0.2, -0.15), "pruned@s0": row(0.01, -0.02, -0.03, 0.039),
             "random-0@s0": row(0.0, 0.0, 0.01, 0.035), "pruned+contextual@s0": row(0.21, -0.22, -0.16, 0.039),
             "pruned@heads-last-s2": row(0.07, -0.1, -0.09)}
    study = {"model": "m", "settings": {"n": 30, "heldout_tasks": ["a", "b", "c"]},
             "unpruned": {"accuracy": 0.4, "copy_rate": 0.5, "copy_effect": 0.2}, "table": table}
    versus = {"pruned_vs_contextual": {"mean": -0.19, "task_ci": [-0.3, -0.08], "holds": False},
              "pruned_vs_batch": {"mean": 0.05, "task_ci": [0.01, 0.09], "holds": beats}}
    crit = {"criteria": {"mechanism": {"mean_over_seeds": {"probe_test": {"holds": True},
                                                           "heldout": {"mean": 0.01, "task_ci": [-0.01, 0.03], "holds": False}}},
                         "versus_calibration": {"mean_over_seeds": versus}}}
    data = root / "docs" / "data"
    data.mkdir(parents=True)
    (data / "copy_mechanism_m.json").write_text(json.dumps(study))
    (data / "copy_mechanism_m_criteria_neurons.json").write_text(json.dumps(crit))


@pytest.mark.parametrize("beats", [False, True])
def test_report_copy_mechanism_section_follows_the_study(tmp_path, beats):
    """The report's study section shows the committed study's rows (frozen arm only, in order, the
    numbers as written), its verdicts, and recommends calibration unless an intervention beats it."""
    from mechcopy.report import _copy_mechanism

    _study_files(tmp_path, beats)
    s = _copy_mechanism("m", tmp_path)
    assert list(s.table["condition"]) == ["contextual", "batch", "pruned@s0", "random-0@s0", "pruned+contextual@s0"]
    assert s.table.iloc[0]["Δ accuracy [task CI]"] == "+0.200 [+0.100, +0.300]"
    assert s.table.iloc[2]["perplexity cost %"] == "3.9"
    assert "A copying mechanism (criterion 1, the neuron arm over seeds): no" in s.text
    assert ("an intervention beats calibration** (pruned_vs_batch)" in s.text) == beats
    assert ("**calibration is the fix**" in s.text) == (not beats)
    assert "has not been run" in _copy_mechanism("other", tmp_path).text
    assert "strongest mechanistic lever" not in s.text                       # no heads-attn files for `m`


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma-3-270m"])
def test_report_copy_mechanism_section_reads_the_committed_study(model):
    """On each committed study (SmolLM2's neuron sets; Gemma's, where no seed chose one) the section's
    verdict is the criteria file's and its contextual row is the summary's."""
    from mechcopy.report import _copy_mechanism

    root = Path(__file__).resolve().parents[1]
    data = root / "docs" / "data"
    table = json.loads((data / f"copy_mechanism_{model}.json").read_text())["table"]
    crit = json.loads((data / f"copy_mechanism_{model}_criteria_neurons.json").read_text())["criteria"]
    versus = crit["versus_calibration"]["mean_over_seeds"]
    s = _copy_mechanism(model, root)
    assert ("chose no set on any selection seed" in s.text) == (not crit["seeds"])
    acc = table["contextual"]["accuracy"]
    row = s.table.set_index("condition").loc["contextual"]
    assert row["Δ accuracy [task CI]"] == f"{acc['diff']:+.3f} [{acc['task_ci'][0]:+.3f}, {acc['task_ci'][1]:+.3f}]"
    assert ("**calibration is the fix**" in s.text) == (not any(v["holds"] for v in versus.values()))
    lever = data / f"copy_mechanism_{model}-n100_heads-attn_criteria_heads-attn.json"
    if lever.is_file():   # the exploratory heads-attn arm's sentence, its numbers from its own files
        vc = json.loads(lever.read_text())["criteria"]["versus_calibration"]["mean_over_seeds"]["pruned_vs_contextual"]
        assert f"minus contextual calibration's is {vc['mean']:+.3f} [task CI {vc['task_ci'][0]:+.3f}" in s.text
        std = data / f"copy_mechanism_{model}-n100_heads-attn_standard.json"
        if std.is_file():   # and what it costs ordinary ICL (the standard construction)
            o = json.loads(std.read_text())["over_seeds"]["heads-attn"]
            assert f"it changes accuracy by {o['mean']:+.3f} [task CI {o['task_ci'][0]:+.3f}" in s.text
            assert ("it harms ordinary ICL" in s.text) == (o["harms"] or json.loads(std.read_text())["table"]["contextual"]["harms"])


def test_report_says_what_the_attention_edit_costs_ordinary_icl(tmp_path):
    """The standard construction's sentence: the arm over seeds and contextual calibration, each with its
    task-level interval and the harm rule's word; nothing where the construction has not run."""
    from mechcopy.report import _ordinary_icl

    path = tmp_path / "s.json"
    assert _ordinary_icl(path) == ""
    cal = {"accuracy": {"diff": 0.05, "task_ci": [-0.01, 0.11]}, "harms": False}
    path.write_text(json.dumps({"table": {"contextual": cal},
                                "over_seeds": {"heads-attn": {"mean": -0.2, "task_ci": [-0.3, -0.1], "harms": True}}}))
    text = _ordinary_icl(path)
    assert "by -0.200 [task CI -0.300, -0.100] over seeds (it harms ordinary ICL)" in text
    assert "contextual calibration by +0.050 [task CI -0.010, +0.110] (no harm detected)" in text
