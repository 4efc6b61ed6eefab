"""CT and radiograph physics for the whole product: the one implementation of each piece.

- `projector`: ParallelBeam / FanBeam geometry, `Projector` (cached sparse Joseph system matrix,
  forward + exact adjoint, differentiable, batched, device-agnostic), `fbp` (parallel FBP;
  fan beam via differentiable fan->parallel rebinning).
- `materials`: 120 kVp spectrum, NIST mass attenuation tables, `hu_to_mu` / `mu_to_hu`,
  `simulate_ct_acquisition` (polychromatic CT with metal, CNNMAR / DuDoNet protocol).
- `drr`: differentiable cone-beam DRR (`drr`) and `radiograph_from_ct`.

Array conventions follow core/imaging/types.py (HU volumes [z, y, x] in LPS).
"""
from core.physics.drr import VIEW_ROTATIONS, drr, euler_to_matrix, radiograph_from_ct
from core.physics.materials import (
    DEFAULT_SPECTRUM, DENSITY, MASS_ATTENUATION, MU_WATER, REFERENCE_WATER_MM, TABLE_KEV, Spectrum,
    effective_mu, effective_weights, hu_to_mu, kramers_spectrum, mass_attenuation, mu_to_hu,
    simulate_ct_acquisition,
)
from core.physics.projector import FILTERS, FanBeam, Geometry, ParallelBeam, Projector, fbp, filter_sinogram

__all__ = [
    "ParallelBeam", "FanBeam", "Geometry", "Projector", "fbp", "filter_sinogram", "FILTERS",
    "TABLE_KEV", "MASS_ATTENUATION", "DENSITY", "Spectrum", "kramers_spectrum", "DEFAULT_SPECTRUM",
    "mass_attenuation", "effective_weights", "effective_mu", "REFERENCE_WATER_MM", "MU_WATER",
    "hu_to_mu", "mu_to_hu", "simulate_ct_acquisition",
    "drr", "euler_to_matrix", "radiograph_from_ct", "VIEW_ROTATIONS",
]
