"""Old name of :mod:`muscle.compat_train` (the compatibility trainer), kept for one release.

Import from :mod:`muscle.compat_train` instead; this module only re-exports its public names.
"""

from muscle.compat_train import (  # noqa: F401
    CompatObjective,
    CompatResult,
    LiveTeachers,
    OnlineCompatObjective,
    train_compat_from_cache,
    train_compat_online,
)
