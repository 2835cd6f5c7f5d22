"""Model adapters shipped with cachepolicy (installed as ``cachepolicy.adapters``).

One model family per module or folder; each registers its model names through the ``cachepolicy``
entry-point group, like any third-party adapter.
"""
