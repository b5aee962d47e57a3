"""Training service: one accelerate loop for every adapter type.

::

    from adapterhub.train import TrainConfig, train
    result = train(TrainConfig(type="lora", base="tiny-sd1", dataset="datasets/demo", out="demo.safetensors",
                               resolution=64, max_steps=50))

Modules: :mod:`.config` (every option, declared once; TOML; resume rules), :mod:`.data` (samples,
buckets, the latent cache, batch order), :mod:`.conditioning` (text conditioning and its cache),
:mod:`.loop` (the loop), :mod:`.schedule` (learning-rate schedules), :mod:`.state` (resumable
checkpoints), :mod:`.metadata` (kohya ``ss_*``, ModelSpec, ``sshs_*`` hashes), :mod:`.plot` (loss PNG).

An adapter type takes part through ``AdapterType.make_trainable(model, config) -> Trainable``
(:mod:`adapterhub.types`); the loop never names a type.
"""
from adapterhub.train.config import TrainConfig, resolve
from adapterhub.train.loop import TrainingInterrupted, train

__all__ = ["TrainConfig", "TrainingInterrupted", "resolve", "train"]


import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _CallableModule(_types.ModuleType):
    """``adapterhub.train`` is this package once imported (Python sets a package's attribute to its loaded
    submodule): calling it calls :func:`train`, so the public ``adapterhub.train(config)`` always works."""

    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
