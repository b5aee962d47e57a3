"""Built-in captioners (dataset prep), registered through ``adapterhub_captioners`` exactly as a
third party's would be: ``clip-tags`` (open_clip zero-shot tag ranking) and ``caption``
(transformers image-to-text). Heavy imports wait until a captioner is used."""
from adapterhub.hookspecs import hookimpl

from .clip_tags import ClipTags
from .image_to_text import ImageToText


@hookimpl
def adapterhub_captioners():
    return [ClipTags(), ImageToText()]
