"""Users' trivial subclasses of diffusers pipelines and models, for the tests that they run as their base."""

from __future__ import annotations

from typing import Any


def subclass(cls: type, **attrs: Any) -> type:
    """A user's trivial subclass ``My<cls>`` of ``cls``: a method of its own (``owner``), and ``attrs``."""
    return type(f"My{cls.__name__}", (cls,), {"owner": lambda self: "mine", **attrs})


def user_pipeline(pipe: Any) -> Any:
    """``pipe``'s components in a user's subclass of its pipeline, whose transformer (or UNet) is a user's subclass
    too (built from the same config, the same weights loaded), as ``MyPipeline.from_pipe(pipe, transformer=...)``."""
    base_call = type(pipe).__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = base_call(self, *args, **kwargs)
        self.calls = getattr(self, "calls", 0) + 1  # a user's post-processing
        return out

    part = "transformer" if hasattr(pipe, "transformer") else "unet"
    model = getattr(pipe, part)
    own = subclass(type(model)).from_config(model.config)
    own.load_state_dict(model.state_dict())
    mine = subclass(type(pipe), __call__=call).from_pipe(pipe, **{part: own.eval()})
    mine.set_progress_bar_config(disable=True)
    assert type(mine).__name__.startswith("My") and type(getattr(mine, part)).__name__.startswith("My")
    return mine
