"""Documentation stays in step with the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

from schemas.clickhouse import TABLES
from schemas.topics import CATALOG
from services.common.settings import settings_table

REPO = Path(__file__).resolve().parent.parent


def test_readme_configuration_table_is_generated_from_the_settings():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert block, "README lost its settings markers"
    assert block.group(1) == settings_table(), "regenerate: python -m services.common.settings"


def test_storage_doc_lists_every_topic_with_its_partition_count():
    doc = (REPO / "docs" / "storage.md").read_text()
    for spec in CATALOG:
        row = re.search(rf"^\| `{re.escape(spec.name)}` \| (\d+) \|", doc, re.M)
        assert row, f"{spec.name} missing from docs/storage.md"
        assert int(row.group(1)) == spec.partitions, spec.name


def test_storage_doc_lists_every_clickhouse_table():
    doc = (REPO / "docs" / "storage.md").read_text()
    for table in TABLES:
        assert re.search(rf"^\| `{table}` \|", doc, re.M), f"table {table} missing"


def test_configuration_reference_is_generated_from_every_settings_class():
    from services.config_docs import render

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), (
        "regenerate: python -m services.config_docs > docs/configuration.md"
    )


def test_every_cli_group_named_in_the_readme_answers_help():
    from typer.testing import CliRunner

    from services.cli import app

    readme = (REPO / "README.md").read_text()
    groups = sorted(set(re.findall(r"^sluice (\w+)", readme, re.M)))
    assert {"dev", "models", "rollout", "features", "gateway"} <= set(groups)
    for group in groups:
        result = CliRunner().invoke(app, [group, "--help"])
        assert result.exit_code == 0, (group, result.output)
