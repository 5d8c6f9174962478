"""Callbacks for training frameworks, each in its own optional extra.

- :mod:`gradtel.integrations.lightning`: ``GradtelCallback`` for PyTorch Lightning
  (``pip install 'gradtel[lightning]'``).
- :mod:`gradtel.integrations.transformers`: ``GradtelTrainerCallback`` for the
  Hugging Face ``Trainer`` (``pip install 'gradtel[transformers]'``).
"""

__all__: list[str] = []
