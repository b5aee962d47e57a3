"""``caption+wd``: a sentence and tags in one run, as kohya's fine-tuning joins them
(``caption, tag, tag``): the ``caption`` captioner's sentence from ``--model``, then the ``wd``
captioner's tags from ``--tagger``, every other option meaning what it means for each of them.

Both models load before the first image; each image is decoded once, then given to the sentence
model as a PIL image and to the tagger preprocessed (in the data-loading workers).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

from .image_to_text import ImageToText
from .wd import DEFAULT_MODEL, WDTagger


def _both(image, prepare):
    return image, prepare(image)


class CaptionAndTags:
    name = "caption+wd"
    description = "an image-to-text sentence (--model) followed by WD tagger tags (--tagger)"

    def __init__(self):
        self.sentences, self.tagger = ImageToText(), WDTagger()
        self._options = self._tag_options = None

    def _tag_view(self, options):
        """The options as the tagger sees them (its model is --tagger); one object per run, so the
        tagger's load stays a no-op after the first."""
        if options is not self._options:
            self._tag_options = replace(options, model=options.tagger or DEFAULT_MODEL)
            self._options = options
        return self._tag_options

    def load(self, options) -> None:
        self.tagger.load(self._tag_view(options))  # first: its checks are cheap, the sentence model is not
        self.sentences.load(options)

    def transform(self, options):
        return partial(_both, prepare=self.tagger.transform(self._tag_view(options)))

    def caption(self, images, options) -> list:
        pil = [im[0] if isinstance(im, tuple) else im for im in images]
        pixels = [im[1] if isinstance(im, tuple) else im for im in images]
        sentences = self.sentences.caption(pil, options)
        tags = self.tagger.caption(pixels, self._tag_view(options))
        sep = self.tagger.settings.separator
        return [[s] + t if isinstance(t, list) else sep.join(x for x in (s, t) if x)
                for s, t in zip(sentences, tags)]
