"""Baseline reward methods, one module each; every module registers itself with ``@register_method``.

`coplctl methods` finds them by reading these sources, so adding a method is adding a module here.
"""
