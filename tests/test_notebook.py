"""The walkthrough notebook: committed with its outputs, executed here, and its printed numbers still current."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat, nbclient and ipykernel")
pytest.importorskip("nbclient", reason="the test extra installs nbformat, nbclient and ipykernel")
pytest.importorskip("ipykernel", reason="the test extra installs nbformat, nbclient and ipykernel")

from tools.run_notebook import (NOTEBOOK, REGENERATE, execute_notebook, lines_agree, main,  # noqa: E402
                                stale_outputs, text_outputs)

ROOT = Path(__file__).resolve().parents[1]
CPU_LIMIT_S = 120  # what the notebook promises its reader: under 2 minutes on a CPU


def committed():
    return nbformat.read(str(NOTEBOOK), as_version=4)


def test_committed_notebook_shows_every_output_without_machine_paths():
    nb = committed()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "every code cell is committed executed"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(figures) >= 9  # four head heat maps, three channel heat maps, the global allocation, fidelity
    text = "\n".join(line for lines in text_outputs(nb) for line in lines)
    assert str(ROOT) not in text and "Pruning impact" in text and "before KD" in text
    sources = "\n".join(cell.source for cell in code)
    assert "from tools.head_pruning_utils import" in sources


def test_text_outputs_join_stdout_chunks_and_leave_out_figures_and_stderr():
    new = nbformat.v4.new_output
    cell = nbformat.v4.new_code_cell("...", outputs=[
        new("stream", name="stdout", text="cos 0.98"), new("stream", name="stderr", text="a warning\n"),
        new("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<IPython.core.display.Image object>"}),
        new("stream", name="stdout", text="05\nnext line\n"), new("execute_result", data={"text/plain": "42"},
                                                                   execution_count=1)])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("text"), cell])
    assert text_outputs(nb) == [["cos 0.9805", "next line", "42"]]


def test_lines_agree_allows_only_a_rounding_flip_in_a_decimal():
    assert lines_agree("cos 0.9805 | 15.8%", "cos 0.9805 | 15.8%")
    assert lines_agree("cos 0.9805", "cos 0.9806")  # a value on a rounding boundary
    assert not lines_agree("cos 0.9805", "cos 0.9807")
    assert not lines_agree("kept 8 per block", "kept 9 per block")  # counts are exact
    assert not lines_agree("global | 5-11", "global | 5-12")
    assert not lines_agree("cos 0.9805", "cosine 0.9805")


def test_stale_outputs_name_the_cell_and_both_lines():
    fresh = text_outputs(committed())
    stale = copy.deepcopy(fresh)
    cell = next(i for i, lines in enumerate(stale) if any("before KD" in line for line in lines))
    line = next(j for j, text in enumerate(stale[cell]) if "before KD" in text)
    stale[cell][line] = stale[cell][line].replace("before KD 0.", "before KD 1.")
    assert stale_outputs(fresh, fresh) == []
    problems = stale_outputs(stale, fresh)
    assert len(problems) == 1 and problems[0].startswith(f"code cell {cell + 1}: committed ")
    assert stale_outputs(stale[:-1], fresh) == [f"the committed notebook has {len(fresh) - 1} code cells, the fresh "
                                                f"run {len(fresh)}"]


def _tiny_notebook(path: Path, source: str, committed_text: str) -> Path:
    cell = nbformat.v4.new_code_cell(source, execution_count=1,
                                     outputs=[nbformat.v4.new_output("stream", name="stdout", text=committed_text)])
    nbformat.write(nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), str(path))
    return path


def test_check_fails_on_stale_outputs_with_the_command_and_regenerating_fixes_them(tmp_path, capsys):
    notebook = _tiny_notebook(tmp_path / "tiny.ipynb", "import os\nprint(f'{1 / 4:.4f}', os.getcwd())",
                              f"0.2000 {tmp_path}\n")
    assert main(["--notebook", str(notebook), "--check"]) == 1
    err = capsys.readouterr().err
    assert "code cell 1: committed '0.2000" in err and f"`{REGENERATE} --notebook {notebook}`" in err
    assert main(["--notebook", str(notebook)]) == 0
    assert text_outputs(nbformat.read(str(notebook), as_version=4)) == [[f"0.2500 {tmp_path}"]]  # ran in its folder
    assert main(["--notebook", str(notebook), "--check"]) == 0


@pytest.mark.parametrize("content, expected", [
    (None, "No such file or directory"),
    ("{not json", "expected a Jupyter notebook (nbformat 4), got: "),
    ('{"cells": 3}', "expected a Jupyter notebook (nbformat 4), got: "),
])
def test_bad_notebook_file_is_one_error_line_with_status_2(tmp_path, capsys, content, expected):
    path = tmp_path / "given.ipynb"
    if content is not None:
        path.write_text(content)
    assert main(["--notebook", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and expected in err and err.count("\n") == 1


def test_walkthrough_runs_from_its_folder_within_its_time_and_matches_its_committed_outputs():
    run = execute_notebook(NOTEBOOK, timeout=300)
    if run.cpu_seconds is not None:
        assert run.cpu_seconds < CPU_LIMIT_S, f"the walkthrough took {run.cpu_seconds:.0f} s of CPU time"
    problems = stale_outputs(text_outputs(committed()), text_outputs(run.notebook))
    assert not problems, ("\n".join(problems[:10]) + f"\n{NOTEBOOK.relative_to(ROOT)}: the committed outputs are "
                          f"stale; regenerate them with `{REGENERATE}` (or `make notebook`)")
