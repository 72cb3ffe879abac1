"""Temporal modules injected into models.resnet.ResNet through its one hook (see models/resnet.py).

Each file holds one paper's module and a `*_factory(num_segments)` that decides, per `BlockSite`, which
block gets a module: tsm.py (TSM shift), tam.py (TANet's TAM), ctnet.py (CT-Net's CT block),
tdn.py / msn.py (TDN and MSN motion modules).
"""
