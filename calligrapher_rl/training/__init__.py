"""The training run and its Python API (docs/library.md): `Trainer(config, rewards=..., dataset=..., callbacks=...)`.

Names load on first use, so a watcher that only reads run directories (`training.run_dir`) stays light.
"""

_NAMES = {"Trainer": "trainer", "train": "trainer", "TrainerCallback": "callbacks", "StatusCallback": "callbacks",
          "ProgressCallback": "progress"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
