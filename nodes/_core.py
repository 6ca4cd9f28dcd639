"""The core library, whether ComfyUI imports the pack as a package (custom_nodes/<pack>/) or tests import
`nodes` from the repository root."""
try:
    from ..echogen_core import checkpoint, sampler, schedules, subject  # noqa: F401
    from ..echogen_core.errors import CheckpointError, EchoGenError, InputError, MissingDependencyError  # noqa: F401
except ImportError:  # `nodes` is a top-level package (tests): the core is importable directly
    from echogen_core import checkpoint, sampler, schedules, subject  # noqa: F401
    from echogen_core.errors import CheckpointError, EchoGenError, InputError, MissingDependencyError  # noqa: F401


def core_module(name: str):
    """A core submodule by name, imported on first use (keeps optional parts such as segmentation lazy)."""
    import importlib

    package = checkpoint.__name__.rsplit(".", 1)[0]
    return importlib.import_module(f"{package}.{name}")


def schedule_info(width: int, height: int) -> dict:
    s = schedules.nearest_schedule(width, height)
    return {"width": s.width, "height": s.height, "ratio": s.ratio, "size": s.size, "scales": s.num_scales,
            "tokens": s.total_tokens}
