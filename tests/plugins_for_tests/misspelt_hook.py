"""A plugin whose hookimpl name is misspelt: loading it must fail at startup."""

from wirehub import hookimpl


@hookimpl
def wirehub_registr_handlers() -> dict[str, object]:
    return {}
