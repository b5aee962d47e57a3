"""Built-in captioners (dataset prep), registered through ``adapterhub_captioners`` exactly as a
third party's would be: ``clip-tags`` (open_clip zero-shot tag ranking), ``caption``
(transformers image-to-text), ``wd`` (the WD tagger family on onnxruntime) and ``caption+wd``
(a sentence, then tags). Heavy imports wait until a captioner is used."""
from adapterhub.hookspecs import hookimpl

from .clip_tags import ClipTags
from .combined import CaptionAndTags
from .image_to_text import ImageToText
from .wd import WDTagger


@hookimpl
def adapterhub_captioners():
    return [ClipTags(), ImageToText(), WDTagger(), CaptionAndTags()]
