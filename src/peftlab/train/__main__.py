"""``python -m peftlab.train ARGS`` = ``peftlab train ARGS``: the entry point each process of
``peftlab train --nproc N`` (or ``torchrun -m peftlab.train ...``) runs."""

import sys

from peftlab.cli import app
from peftlab.train import distributed

sys.argv = ["peftlab", "train", *sys.argv[1:]]  # what `peftlab train ARGS` sees (the model card quotes it)
try:
    app(sys.argv[1:], prog_name="peftlab")
finally:
    distributed.shutdown()  # leave the process group before exit (NCCL warns otherwise)
