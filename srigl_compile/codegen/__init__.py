"""Everything TVM-specific: kernel definitions, schedule rules, tuning, the torch custom op, targets.

This is the only package that imports ``tvm``, and only when its modules are imported (by ``lower()``), never by
``import srigl_compile``.
"""
