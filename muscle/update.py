"""Old name of :mod:`muscle.update_config` (update configs: models named in a TOML file), kept
for one release. Import from :mod:`muscle.update_config` instead."""

from muscle.update_config import (  # noqa: F401
    UpdateConfig,
    load_update_config,
    resolve_model,
)
