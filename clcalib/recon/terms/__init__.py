"""What a unit's loss gets beside its reconstruction MSE (PD-Quant's prediction difference,
CL-Calib's contrastive term): ``unit.unit_terms`` builds them per unit, ``contrastive`` and
``prediction_difference`` are their losses as pure functions on tensors."""
