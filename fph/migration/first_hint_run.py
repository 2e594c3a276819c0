"""How round 0 meets the guest's first hint run: a choice of the user's (MigrateRequest, ``fph migrate
--first-hint-run``), in a module of its own so that the CLI can name it without loading the engine."""

from __future__ import annotations

import enum


class FirstHintRun(enum.Enum):
    """See ``PrecopyConfig.first_hint_run`` (fph/migration/precopy.py) for what each does."""

    AUTO = "auto"
    OVERLAP = "overlap"
    WAIT = "wait"
