"""docs/rollouts.md stays in step with the controller's settings, storage and API."""

from __future__ import annotations

import re
from pathlib import Path

from services.rollout.machine import Action
from services.rollout.publisher import routing_key
from services.rollout.settings import RolloutSettings
from services.rollout.store import COLUMNS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "rollouts.md").read_text()


def test_every_rollout_setting_is_documented_with_its_default():
    for name, field in RolloutSettings.model_fields.items():
        if not name.startswith("rollout_"):
            continue
        default = field.default if field.default_factory is None else field.default_factory()
        row = re.search(rf"^\| `SLUICE_{name.upper()}` \| `([^`]*)` \|", DOC, re.M)
        assert row, f"SLUICE_{name.upper()} missing from docs/rollouts.md"
        assert row.group(1) == str(default), name


def test_the_redis_key_and_every_decision_column_and_action_are_documented():
    assert f"`{routing_key('{model}')}`" in DOC
    for column in COLUMNS:
        assert f"`{column}" in DOC, column
    for action in Action:
        assert action.value in DOC, action
