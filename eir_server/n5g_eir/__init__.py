"""N5g-eir EquipmentIdentityCheck (TS 29.511): the 5G interface to the same verdicts as S13."""
