"""fa4aot's integrations with other libraries (the modules that may import torch):

- :mod:`fa4aot.integrations.flash_attn`: FA4's entry points with FA4's signatures, served by
  fa4aot (what :func:`fa4aot.patch` routes ``flash_attn.cute`` and its vendored copies to);
- :mod:`fa4aot.integrations.transformers`: the ``"fa4aot"`` attention backend for Hugging Face
  transformers (``attn_implementation="fa4aot"``).

Nothing here is imported by ``import fa4aot``.
"""
