"""Imported by the ``fa4aot_patch.pth`` line (installed into site-packages with fa4aot) when
``$FA4AOT_PATCH`` is set: patches FA4's entry points at interpreter start (see
:func:`fa4aot.dropin.install_from_env`). Imports neither torch nor flash_attn: FA4's modules are
patched by the import hook when the program imports them."""

from fa4aot.dropin import install_from_env

install_from_env()
