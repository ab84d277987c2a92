"""lightbooth: fast, personalized text-to-image generation.

    from lightbooth import Generator
    g = Generator.load()                     # the built-in model, or Generator.load("path/or/hub-id", loras=[...])
    images = g("a red circle", seed=42, num_images=4)
"""

__version__ = "0.1.0"
__all__ = ["Generator", "builtin_model_path", "LightboothError"]


def __getattr__(name):  # heavy imports (torch, diffusers) only when used
    if name == "Generator":
        from .generate import Generator

        return Generator
    if name == "builtin_model_path":
        from .models import builtin_model_path

        return builtin_model_path
    if name == "LightboothError":
        from .errors import LightboothError

        return LightboothError
    raise AttributeError(name)
