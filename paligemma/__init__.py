"""paligemma: PaliGemma 1 and 2 from scratch in PyTorch.

    import paligemma
    model, processor = paligemma.load("path/to/checkpoint")
    batch = processor(text=["caption en"], images=[image])
    new_ids = model.generate(**batch, max_new_tokens=32)
    print(processor.batch_decode(new_ids))
"""

from .config import PaliGemmaConfig, TextConfig, VisionConfig
from .errors import CheckpointError, InputError, PaliGemmaError
from .generation import SamplingConfig, TextStreamer, generate, stream_tokens
from .loading import load, load_model, save_pretrained
from .modeling_paligemma import PaliGemmaForConditionalGeneration

__version__ = "0.1.0"

from pathlib import Path as _Path

SHAPES_TINY = _Path(__file__).resolve().parent / "assets" / "shapes-tiny"  # the shipped model (no download)


def __getattr__(name):  # the processor and task helpers import PIL; load them on first use
    if name in ("PaliGemmaProcessor",):
        from . import processing_paligemma

        return getattr(processing_paligemma, name)
    if name in ("GemmaTokenizer",):
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'paligemma' has no attribute {name!r}")
