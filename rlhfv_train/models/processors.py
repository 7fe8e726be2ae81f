"""Building transformers processors here: the image-only variant of a processor class whose video processor cannot be
built (transformers' video processors need torchvision, which does not import beside PyPI's CPU-only torch wheel).
Used by the loader for saved processors (loading.py) and by the tiny families (tiny_families.py)."""
from __future__ import annotations

import inspect
from typing import Callable


def can_build_video_processors() -> bool:
    """Whether transformers' video processors can be built here (they need torchvision)."""
    from transformers.utils import is_torchvision_available
    return is_torchvision_available()


def with_video(processor_class, video_processor: Callable, **kwargs):
    """processor_class(**kwargs) with its video processor (video_processor(), built only where torchvision imports),
    else the image-only processor (without_video)."""
    if can_build_video_processors():
        return processor_class(video_processor=video_processor(), **kwargs)
    return without_video(processor_class)(**kwargs)


def without_video(processor_class):
    """An image-only subclass of a transformers processor class: the same processor without its video processor
    (which needs torchvision). Its from_pretrained and __init__ skip the video processor."""
    attrs = {
        "get_attributes": classmethod(lambda cls: [a for a in processor_class.get_attributes()
                                                   if a != "video_processor"]),
    }
    params = inspect.signature(processor_class.__init__).parameters
    if "video_processor" in params and params["video_processor"].default is inspect.Parameter.empty:
        attrs["__init__"] = _init_with_default_video(processor_class, params)
    image_only = type(processor_class.__name__, (processor_class,), attrs)
    image_only.__qualname__ = processor_class.__qualname__
    return image_only


def _init_with_default_video(processor_class, params):
    """processor_class.__init__ with video_processor=None as default (SmolVLM's requires the argument), written with
    the parent's own parameter names: from_pretrained reads the accepted arguments from __init__'s code."""
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    defaults = {n: params[n].default for n in names if params[n].default is not inspect.Parameter.empty}
    defaults["video_processor"] = None
    listed = ", ".join(f"{n}=_defaults[{n!r}]" if n in defaults else n for n in names)
    call = ", ".join(f"{n}={n}" for n in names[1:])
    namespace = {"_defaults": defaults, "_parent": processor_class}
    exec(f"def __init__({listed}, **kwargs):\n    _parent.__init__(self, {call}, **kwargs)\n", namespace)
    return namespace["__init__"]
