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


from adapterhub.callable_module import make_callable  # noqa: E402

make_callable(__name__, "train")  # the package attribute may become this module: calling it calls train()
