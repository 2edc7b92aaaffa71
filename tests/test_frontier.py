"""benchmarks/frontier.py on a fake run of benchmarks/quality.py made from a tiny random student: the table, the
section it writes into the quality page (inserted before the runs table, then replaced in place), the plot."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from phi3skip.model import bypass
from phi3skip import Phi3Config, Phi3ForCausalLM, save_pretrained
from phi3skip.model.cost import cost_fraction

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
CFG = dict(model_type="phi3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           original_max_position_embeddings=64, torch_dtype="float32")
PAGE = """# Quality of skipped inference: recipes tried

Intro.

## Probe

Text.
## Runs

| run | recipe | order | train tokens |
|---|---|---|---|
| 1 | a | 2,0 | 0 |
"""


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(BENCH))  # as when run as a script: benchutil beside it
    yield importlib.import_module("frontier")
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as benchmarks/quality.py leaves it: student/ with bypasses for layers 2, 0; results.json."""
    run = tmp_path_factory.mktemp("quality") / "20990101-000000"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config.from_dict(CFG))
    model.init_weights(0.2)
    bypass.attach(model, [2, 0], rank=4, mlp=8)
    save_pretrained(model, run / "student", extra_json={"skip.json": {"layers": [2, 0]}})
    ratios = [{"code": 1.0, "prose": 1.0}, {"code": 1.25, "prose": 1.5}, {"code": 2.0, "prose": 2.5}]
    (run / "results.json").write_text(json.dumps({"name": "tiny recipe", "layers": [2, 0], "ratios": ratios}))
    return run


def test_table_has_each_prefix_with_its_cost_and_ratios(frontier, run_dir):
    run = frontier.load_run(run_dir)
    rows = frontier.rows_of(run, 16)
    assert [r.skip for r in rows] == [(), (2,), (2, 0)]
    assert rows[2].cost == cost_fraction(run.config, (2, 0), run.bypass, 16)
    lines = frontier.table(rows).splitlines()
    assert lines[0].startswith("| run | recipe | skipped slot runs | k | skip | MACs | bytes |")
    f = rows[1].cost
    assert lines[3] == (f"| 20990101-000000 |  |  | 1 | 2 | {float(f.macs):.3f} | {float(f.bytes):.3f} | – | 1.250 | "
                        "1.500 |")
    assert "tiny recipe | bypass: rank-4 map + 8 MLP channels" in lines[2] and "| none | 1.000 | 1.000 |" in lines[2]


def test_section_goes_before_the_runs_table_then_is_replaced_in_place(frontier, run_dir, tmp_path, monkeypatch):
    md = tmp_path / "quality.md"
    md.write_text(PAGE)
    argv = ["frontier.py", "--runs", str(run_dir), "--no-speed", "--context", "16", "--out-md", str(md)]
    monkeypatch.setattr(sys, "argv", argv)
    frontier.main()
    text = md.read_text()
    head, rest = text.split(frontier.HEADING + "\n")
    assert head == PAGE.split("## Runs")[0] + "\n"  # a blank line added before the heading
    assert rest.index("| 20990101-000000 | tiny recipe |") < rest.index("\n## Runs\n\n| run | recipe | order |")
    assert "context of 16 tokens" in rest and "not measured here (`--no-speed`)" in rest
    assert text.endswith(PAGE.split("Text.\n")[1])  # the runs table untouched, still last: quality.py appends to it
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "frontier.png").stat().st_size > 0 and "](frontier.png)" in rest
    frontier.main()  # again: the section replaced, nothing else changes
    assert md.read_text() == text
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--no-write", "--out-md", str(tmp_path / "other.md")])
    frontier.main()
    assert not (tmp_path / "other.md").exists()


def test_put_section_without_a_runs_heading_or_any_table(frontier):
    new = frontier.HEADING + "\n\nbody\n"
    bare = "# T\n\n| run | recipe | order |\n|---|\n"  # quality.py's own header: no '## Runs'
    assert frontier.put_section(bare, new) == "# T\n\n" + new + "\n| run | recipe | order |\n|---|\n"
    assert frontier.put_section("# T\n", new) == "# T\n\n" + new
    assert frontier.put_section("", new) == new
    at_end = frontier.put_section("# T\n", new)
    assert frontier.put_section(at_end, new.replace("body", "other")) == "# T\n\n" + new.replace("body", "other")


def test_measured_speedups_cover_every_prefix(frontier, run_dir):
    run = frontier.load_run(run_dir)
    speed = frontier.measure_speedups(run, context=24, new_tokens=4, rounds=1)
    assert set(speed) == {(), (2,), (2, 0)} and speed[()] == 1.0 and all(v > 0 for v in speed.values())
    with pytest.raises(frontier.UserError, match="--context 65"):
        frontier.measure_speedups(run, context=65, new_tokens=4, rounds=1)
