"""The notebooks under notebooks/ cannot rot: every code cell runs, in order, in one namespace, from
a fresh working directory (as a kernel would run them top to bottom)."""

import json
import os
from pathlib import Path


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, workdir: Path) -> dict:
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {"__name__": "__notebook__"}
    before = Path.cwd()
    os.chdir(workdir)
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"{path.name} cell {i}", "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace


def test_every_notebook_is_listed_here():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["toolkit_tour.ipynb"]


def test_the_toolkit_tour_runs_and_its_answers_hold(tmp_path, one_thread):
    ns = run_notebook(NOTEBOOKS / "toolkit_tour.ipynb", tmp_path)
    out = tmp_path / "toolkit_tour"
    for name in ("identifiability.png", "patch_classes.png", "attribution.png", "attention.png", "patching.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert (out / "attention.html").stat().st_size > 0
    assert float(ns["gap"].abs().max()) < 1e-3  # the attribution sums to the logit
    rows = {(r["layer"], r["token"]): r for r in ns["lens_rows"]}
    assert rows[(2, "cls")]["top1"] > 0.6  # the trained mouse reads its class off the last class token
    assert {r["condition"] for r in ns["perturbed"]} == {"none", "no_cls", "self_only", "object_only",
                                                         "background_only"}
    last_cls = [r for r in ns["probe_rows"] if r["layer"] == 2 and r["token"] == "cls"][0]
    assert last_cls["probe_accuracy"] > last_cls["chance"] + 0.15
    assert ns["timm_lens"].cls_r.shape == (13, 8)
