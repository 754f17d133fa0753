"""Model transforms: functions that rewrite the modules of any model, not model families
(``mammut.models``) and not image transforms (the data pipeline's are in ``mammut.data``).

- :mod:`mammut.transforms.m2pt`: M2PT, Multimodal Pathway (arXiv 2401.14405): pathway linears
  that add an auxiliary model's weights to a target's (``add_pathways``), folded back into
  plain linears after training (``merge_pathways``); its public names are exported by ``mammut``.

Library core: imports only torch.
"""
