"""PEFT methods of peft-compress, one sub-package each; installed as ``compress.plugins``."""
