"""Typed model configs, as mlx-examples' `FluxParams`: built from a component's config.json.

A diffusers config is exactly its model's constructor arguments, so a field the model needs that is
missing, or a key that is not one of them, is a ConfigError naming it: a config never silently falls
back to another model's size.
"""

import dataclasses

META = ("quantization",)  # ours (a folder saved quantized); diffusers' own metadata keys start with "_"


class ConfigError(ValueError):
    """A config.json that does not describe this model: the message names the key."""


def from_config(cls, config: dict, ignored=()):
    """`cls(**fields)` from a config dict: the dataclass's fields without a default are required;
    keys that are not fields are an error unless listed in `ignored` (or diffusers' metadata)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{cls.__name__}: a config is a JSON object, not {type(config).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in config]
    if missing:
        raise ConfigError(f"{cls.__name__} config lacks {', '.join(missing)}")
    unknown = sorted(k for k in set(config) - set(fields) - set(ignored) - set(META) if not k.startswith("_"))
    if unknown:
        raise ConfigError(f"{cls.__name__} config has unknown key(s) {', '.join(unknown)}")
    return cls(**{k: v for k, v in config.items() if k in fields})
