"""Built-in cache policies (installed as ``cachepolicy.plugins``), one policy per module.

Each module is an entry point of the ``cachepolicy`` group and implements ``cachepolicy_policies``.
"""
