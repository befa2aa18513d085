"""docs/configuration.md is generated from the schema (fedtune.common.config_reference) and kept current."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedtune.common import config_reference as ref
from fedtune.common.config import FedTuneConfig, SiteConfig, config_flags, config_keys

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


def test_docs_configuration_md_is_current():
    assert DOC.is_file(), f"{DOC.relative_to(REPO)} is missing: generate it with `{ref.COMMAND}`"
    assert DOC.read_text(encoding="utf-8") == ref.render(), (
        f"{DOC.relative_to(REPO)} is stale (the schema in common/config.py changed): regenerate it with `{ref.COMMAND}`"
    )


def test_the_generator_writes_where_the_test_reads():
    assert ref.DOC_PATH == DOC


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def _rows(text: str) -> dict[str, list[str]]:
    """The reference's key rows: key -> its cells (type, default, flag, description)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 5 and "." in cells[0]:
            assert cells[0] not in rows, f"{cells[0]} is listed twice"
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_key_of_the_schema_has_one_row_with_a_description():
    # The keys found another way than the generator's walk: a default config, dumped.
    expected = _dotted(FedTuneConfig().model_dump())
    expected.append("tune.space")  # a mapping of keys to ranges (empty by default), not a section
    expected += [f"federation.sites[].{name}" for name in SiteConfig.model_fields]
    rows = _rows(ref.render())
    assert sorted(rows) == sorted(expected)
    undocumented = [k for k, cells in rows.items() if not cells[3]]
    assert not undocumented, f"give these Fields a description in common/config.py: {undocumented}"


def test_rows_give_type_default_allowed_values_and_flags():
    rows = _rows(ref.render())
    assert rows["federation.rounds"][:3] == ["integer in [1, 100000]", "`3`", "`--rounds N` (ftsim, ftserver)"]
    assert rows["federation.update_norm_bound"][0] == "number in (0, 1000000.0], or one of `auto`, `off`, or null"
    assert rows["privacy.delta"][:2] == ["number in (0, 0.1)", "`1e-05`"]
    assert rows["model.device"][0] == "one of `auto`, `cpu`, `cuda`"
    assert rows["federation.sites[].name"][1] == "required"
    assert rows["secure_aggregation.enabled"][2] == (
        "`--secure-aggregation` (ftsim: sets true); `--no-secure-aggregation` (ftserver: sets false)"
    )
    assert rows["train.anchor_mu"][3].count("\\|\\|") == 2  # a pipe in a description does not split the row
    assert "ftsim-runs/&lt;time&gt;" in rows["output.dir"][3]  # nor does <time> vanish as an HTML tag
    for f in config_flags():  # every flag is in the flags table and in its key's row
        assert f"| `{f.usage()}` | `{f.key}` |" in ref.render()
        assert f"`{f.usage()}`" in rows[f.key][2]
    assert len(rows) == len(config_keys())


def test_the_partition_note_lists_the_keys_ftsim_reads():
    from fedtune.simulations.cli import PARTITION_KEYS

    assert ref.FTSIM_PARTITION_KEYS == PARTITION_KEYS


def test_generation_is_deterministic_across_processes():
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-m", "fedtune.common.config_reference"], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout == ref.render() == ref.render()


def test_check_and_write(tmp_path, monkeypatch, capsys):
    target = tmp_path / "docs" / "configuration.md"
    monkeypatch.setattr(ref, "DOC_PATH", target)
    assert ref.main(["--check"]) == 1
    assert f"is stale: regenerate it with `{ref.COMMAND}`" in capsys.readouterr().err
    assert ref.main(["--write"]) == 0 and target.read_text(encoding="utf-8") == ref.render()
    assert ref.main(["--check"]) == 0
    target.write_text(ref.render().replace("Federated rounds.", "Rounds."), encoding="utf-8")
    assert ref.main(["--check"]) == 1


def test_the_reference_says_it_is_generated():
    head = ref.render().splitlines()[2]
    assert ref.COMMAND in head and "edit the schema, not this file" in head
