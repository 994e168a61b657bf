"""The kit's plumbing: one flat package of library modules shared by the stage scripts.

The recipe itself stays at the repository root (model.py, kernels.py, data.py, tokenizer.py,
merge.py, rl.py); stages/ holds one script per recipe stage; the README's Layout tree has a line
per module here.
"""

from kit import console as _console

_console.quiet()  # named library noise filtered once per process, before torch/torchao import (console.py)
