"""Other libraries' models as fastdiff models (`model(x, t, **cond) -> tensor`). Importing this
package imports no adapter's library."""

from __future__ import annotations


def as_model(model):
    """`model` itself, or a diffusers UNet wrapped by fastdiff.adapters.diffusers.wrap."""
    if type(model).__module__.startswith("diffusers."):
        from fastdiff.adapters.diffusers import wrap

        return wrap(model)
    return model


__all__ = ["as_model"]
