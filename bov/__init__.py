"""bov: systematic ablations of how attention layers compute their value vectors.

Pipeline: bov.config -> bov.data -> bov.model -> bov.train -> bov.sweep -> bov.analysis.
"""

__version__ = "0.1.0"
