"""adapterhub: inspect, merge, attach, stack, train and sample Stable Diffusion adapters.

The public Python API (everything a programmatic user needs, importable from ``adapterhub``)::

    import adapterhub
    from adapterhub import Stack, Generator, load_base

    pipe = load_base("tiny-sd1")                   # a preset, a diffusers folder, a .safetensors checkpoint, a hub id
    facts = adapterhub.inspect("style.safetensors")  # what `adapterhub inspect --json` prints
    style = adapterhub.load("style.safetensors")   # an Adapter
    handle = style.attach(pipe, 0.8)               # reversible: handle.set_weight(0.5); handle.detach()
    style.merge_into(pipe, 0.8)                    # for good
    style.save("style-kohya.safetensors")

    stack = Stack.parse("style.safetensors:0.8, detail.safetensors:0.3").apply(pipe)   # several, switchable
    stack.remove()                                 # every tensor back, bit for bit
    images = Generator("tiny-sd1", backend="compiled")("a house <lora:style:0.8>")
    adapterhub.convert("style.safetensors", to="diffusers", out="style-diffusers.safetensors")
    adapterhub.train(adapterhub.TrainConfig(type="lora", base="tiny-sd1", dataset="datasets/demo",
                                            out="demo.safetensors", resolution=64, max_steps=50))
    with adapterhub.open_catalog() as catalog:     # ./catalog.db, $ADAPTERHUB_CATALOG or a URL
        ...

One way to attach: ``Adapter.attach(pipe, weight, **options)`` (options such as ``image=``, ``start=``,
``end=`` for ControlNet / T2I-Adapter); ``Stack`` for several. Names are imported on first use, so
``import adapterhub`` (and ``adapterhub --help``) stays fast: it imports neither torch nor diffusers.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # files
    "identify": "adapterhub.api", "inspect": "adapterhub.api", "load": "adapterhub.api",
    "convert": "adapterhub.convert",
    # models and stacks
    "load_base": "adapterhub.base", "Stack": "adapterhub.stack", "Generator": "adapterhub.sample.generator",
    "Request": "adapterhub.sample.generator",
    # training
    "train": "adapterhub.train", "TrainConfig": "adapterhub.train",
    # the catalog
    "Catalog": "adapterhub.catalog", "open_catalog": "adapterhub.catalog",
    # the contract's types
    "Adapter": "adapterhub.types", "AdapterType": "adapterhub.types", "Handle": "adapterhub.types",
    "Patch": "adapterhub.types", "Sniff": "adapterhub.types",
    "AdapterError": "adapterhub.errors", "AdapterhubError": "adapterhub.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adapterhub' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
