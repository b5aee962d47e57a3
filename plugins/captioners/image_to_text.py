"""``caption``: natural-language captions from a transformers image-to-text model.

Anything ``AutoModelForImageTextToText`` loads (BLIP, BLIP-2, GIT, Florence-2, vision
encoder-decoder ...) with its ``AutoProcessor``, from a local folder or a hub id. Decoding is
greedy or beam search (``num_beams``), at most ``max_length`` new tokens; a ``prompt`` conditions
the caption and is removed from the output.
"""
from __future__ import annotations

from adapterhub.errors import AdapterhubError

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ImageToText:
    name = "caption"
    description = "natural-language captions from a transformers image-to-text model (BLIP, GIT, ...)"

    def __init__(self):
        self._key = None
        self.model = self.processor = None

    def load(self, options) -> None:
        import torch
        import transformers

        if not options.model:
            raise AdapterhubError("caption needs --model: a local folder or a hub id "
                                  "(e.g. Salesforce/blip-image-captioning-base)")
        key = (options.model, str(options.device), options.precision)
        if self._key == key:
            return
        dtype = getattr(torch, _DTYPES.get(options.precision, "float32"))
        try:
            processor = transformers.AutoProcessor.from_pretrained(options.model)
            model = transformers.AutoModelForImageTextToText.from_pretrained(options.model, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise AdapterhubError(f"caption: cannot load {options.model}: {first[:300]}") from None
        self.model, self.processor, self._key = model.to(options.device).eval(), processor, key

    def _inputs(self, images, options):
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if options.prompt:
            kwargs["text"] = [options.prompt] * len(images)
        inputs = self.processor(**kwargs).to(options.device)
        if "pixel_values" in inputs and self.model.dtype != inputs["pixel_values"].dtype:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def caption(self, images, options) -> list[str]:
        import torch

        self.load(options)
        inputs = self._inputs(images, options)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=options.max_length,
                                      num_beams=options.num_beams, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [self._clean(t, options.prompt) for t in texts]

    @staticmethod
    def _clean(text: str, prompt: str | None) -> str:
        text = " ".join(text.split())
        if prompt and text.lower().startswith(prompt.lower().strip()):
            text = text[len(prompt.strip()):].strip()
        return text
