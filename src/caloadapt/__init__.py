"""caloadapt: cross-geometry transfer learning for fast calorimeter shower simulation.

The pipeline is ``geometry -> simulate -> data -> models -> adapt/train -> generate -> evaluate ->
report``; each stage is a subpackage and they exchange a few plain types: a ragged batch of
showers in physical units (:class:`caloadapt.data.Showers`), a detector geometry
(:class:`caloadapt.geometry.Geometry`) and checkpoints.

The method follows L. Valente, G. Kasieczka, F. Gaede, *Cross-Geometry Transfer Learning in Fast
Electromagnetic Shower Simulation*, arXiv:2512.00187.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
