"""The run that tests/train/test_resume.py kills: ``python -m tests.train.killed_run OUTPUT_DIR THREADS``.

It trains the same run as the test's uninterrupted one, and after step 5 waits to be killed, so
the kill lands mid-run: checkpoint 4 is on disk, step 5 is in metrics.jsonl but in no checkpoint.
"""

import sys
import time

import torch

from peftlab.train import train

from .common import collate, counting_rows, lora_llama, resume_args


def main(output_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)  # as in the test process: CPU kernels may split sums by thread

    def wait_after_step_5(event):
        if event["event"] == "train" and event["step"] == 5:
            time.sleep(600)

    train(lora_llama(), counting_rows(32), args=resume_args(output_dir), collate_fn=collate, on_log=wait_after_step_5)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
