"""Update configs: a small TOML file that names the models of one update.

A user describes an update (v1 -> v2, and later the compatibility model v2c) once, and every
command refers to the models by name (``--config update.toml --model v1``)::

    # update.toml
    task = "piqa"            # optional default task

    [models.v1]
    base = "HuggingFaceTB/SmolLM2-135M"      # hub id, local dir, or .gguf file
    adapter = "runs/piqa/v1"                 # optional PEFT adapter dir

    [models.v2]
    base = "runs/base-v2"
    adapter = "runs/piqa/v2"
    dtype = "bfloat16"

Relative paths are resolved against the config file's folder. Explicit ``--base/--adapter``
flags work everywhere too; :func:`resolve_model` turns either form into a :class:`ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from muscle import MuscleError
from muscle.config import ModelSpec

_MODEL_KEYS = {"base", "adapter", "revision", "gguf_file", "dtype"}


@dataclass(frozen=True)
class UpdateConfig:
    path: Path
    models: dict[str, ModelSpec] = field(default_factory=dict)
    task: str | None = None


def _resolve_path(value: str | None, root: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = root / p
    # A hub id like "org/name" stays as it is unless such a folder exists next to the config.
    if value.startswith(".") or candidate.exists() or value.count("/") != 1:
        return str(candidate)
    return value


def load_update_config(path: str | Path) -> UpdateConfig:
    path = Path(path)
    if not path.is_file():
        raise MuscleError(f"update config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise MuscleError(f"{path}: not valid TOML ({e})") from None
    root = path.parent
    models: dict[str, ModelSpec] = {}
    for name, entry in (raw.get("models") or {}).items():
        if not isinstance(entry, dict) or "base" not in entry:
            raise MuscleError(f'{path}: [models.{name}] needs at least base = "..."')
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise MuscleError(
                f"{path}: [models.{name}] has unknown key(s) {', '.join(sorted(unknown))}"
            )
        models[name] = ModelSpec(
            base=_resolve_path(entry["base"], root),
            adapter=_resolve_path(entry.get("adapter"), root),
            revision=entry.get("revision"),
            gguf_file=entry.get("gguf_file"),
            dtype=entry.get("dtype", "float32"),
        )
    return UpdateConfig(path=path, models=models, task=raw.get("task"))


def resolve_model(
    *,
    config: str | Path | None = None,
    model: str | None = None,
    base: str | None = None,
    adapter: str | None = None,
    dtype: str | None = None,
) -> tuple[str, ModelSpec]:
    """(name, spec) from either ``--config/--model`` or ``--base [--adapter]``.

    Explicit ``--adapter``/``--dtype`` override what the config says.
    """
    if model is not None:
        if config is None:
            raise MuscleError(f"--model {model} needs --config update.toml naming the models")
        cfg = load_update_config(config)
        if model not in cfg.models:
            known = ", ".join(sorted(cfg.models)) or "none"
            raise MuscleError(f"unknown model {model!r} in {config}: it names {known}")
        spec = cfg.models[model]
        if adapter or dtype:
            spec = replace(spec, adapter=adapter or spec.adapter, dtype=dtype or spec.dtype)
        return model, spec
    if base is None:
        raise MuscleError(
            "name a model: --base PATH [--adapter DIR], or --config FILE --model NAME"
        )
    return Path(adapter).name if adapter else Path(base).name, ModelSpec(
        base, adapter, dtype=dtype or "float32"
    )
