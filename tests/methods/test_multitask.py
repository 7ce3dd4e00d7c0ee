"""Multitask prompt tuning: P_k = P ⊙ (U_k V_k) per row, task ids, source inits, a learning run.

Parity with Hugging Face PEFT is in tests/formats/test_hf_peft_ptuning_multitask.py; the shared
invariants (mixed batches, save/load, gradients) in tests/methods/test_invariants.py.
"""

import peft
import pytest
import torch

from peftlab import AdapterLoadError, ConfigError, MultitaskPromptConfig, PromptTuningConfig, get_peft_model
from peftlab.data import collate
from peftlab.formats import read_adapter
from peftlab.models import tiny
from peftlab.train import TrainArgs, train


def adapter_of(model, name="default"):
    return model.model_adapters[name]


def scramble(adapter, seed=0):
    """Give U and V unit scale (PEFT's init is 0.02), so every task's prompt differs visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in (adapter.prefix_task_cols, adapter.prefix_task_rows):
            t.copy_(torch.randn(t.shape, generator=g))


def test_prompt_is_shared_times_task_product_per_row():
    model = get_peft_model(tiny("llama"), MultitaskPromptConfig(num_virtual_tokens=4, num_tasks=3, num_ranks=2))
    a = adapter_of(model)
    P, U, V = a.embedding.weight, a.prefix_task_cols, a.prefix_task_rows
    assert (P.shape, U.shape, V.shape) == ((4, 32), (3, 4, 2), (3, 2, 32))
    task_ids = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        out = a.prompt(4, task_ids=task_ids)
        for b, t in enumerate(task_ids.tolist()):
            torch.testing.assert_close(out[b], P * (U[t] @ V[t]))


def test_rows_of_one_batch_get_their_own_task(tmp_path):
    base = tiny("llama").eval()
    model = get_peft_model(base, MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=2))
    scramble(adapter_of(model))
    ids = torch.randint(3, 100, (3, 6))
    task_ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=task_ids).logits
        for task in (0, 1):
            alone = model(input_ids=ids, task_ids=torch.full((3,), task)).logits
            rows = task_ids == task
            torch.testing.assert_close(mixed[rows], alone[rows])
        # And each row's virtual tokens are its task's: the closed form, spliced by hand.
        prompts = adapter_of(model).prompt(3, task_ids=task_ids)
        expected = base(inputs_embeds=torch.cat([prompts, base.get_input_embeddings()(ids)], dim=1)).logits
        torch.testing.assert_close(mixed, expected)
        assert (mixed[0] - model(input_ids=ids, task_ids=torch.tensor([0, 0, 1])).logits[0]).abs().max() > 1e-3


def test_seq2seq_prompts_encoder_and_decoder():
    """PEFT's generic seq2seq path for this method: rows 0..n-1 go before the encoder input,
    rows n..2n-1 before the decoder input."""
    base = tiny("t5", "seq2seq").eval()
    model = get_peft_model(base, MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=2, task_type="SEQ_2_SEQ_LM"))
    scramble(adapter_of(model))
    ids, dec = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 4))
    task_ids = torch.tensor([1, 0])
    emb = base.get_input_embeddings()
    with torch.no_grad():
        p = adapter_of(model).prompt(2, task_ids=task_ids)  # (2, 2n, d)
        assert p.shape == (2, 6, 32)
        out = model(input_ids=ids, decoder_input_ids=dec, task_ids=task_ids).logits
        expected = base(inputs_embeds=torch.cat([p[:, :3], emb(ids)], 1),
                        decoder_inputs_embeds=torch.cat([p[:, 3:], emb(dec)], 1)).logits
        torch.testing.assert_close(out, expected)


def test_task_id_errors():
    model = get_peft_model(tiny("llama"), MultitaskPromptConfig(num_virtual_tokens=2, num_tasks=2), adapter_name="mt")
    ids = torch.randint(3, 100, (2, 4))
    with pytest.raises(ValueError, match=r"adapter 'mt' needs \['task_ids'\]"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"adapter 'mt' needs \['task_ids'\]"):
        model(input_ids=ids, task_ids=None)
    with pytest.raises(ValueError, match=r"task_ids \[2, 5\] out of range: this adapter has num_tasks=2 \(ids 0..1\)"):
        model(input_ids=ids, task_ids=torch.tensor([2, 5]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(2,\).*got torch.int64 of shape \(1,\)"):
        model(input_ids=ids, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor .* got torch.float32"):
        model(input_ids=ids, task_ids=torch.tensor([0.0, 1.0]))


def test_task_ids_never_reach_the_base_model():
    base = tiny("llama").eval()
    model = get_peft_model(base, MultitaskPromptConfig(num_virtual_tokens=2, num_tasks=2))
    ids = torch.randint(3, 100, (2, 4))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits, expected)
        out = model(input_ids=ids, task_ids=torch.tensor([0, 1]), adapter_names=["__base__", "__base__"]).logits
        torch.testing.assert_close(out, expected)


def test_one_file_holds_every_task(tmp_path):
    model = get_peft_model(tiny("t5", "seq2seq"), MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=4, num_ranks=2))
    model.save_pretrained(tmp_path)
    _, tensors = read_adapter(tmp_path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (6, 32), "prefix_task_cols": (4, 6, 2), "prefix_task_rows": (4, 2, 32)}


@pytest.mark.parametrize("source_format", ["peftlab", "peft", "hf-peft"])
def test_shared_prompt_from_a_prompt_tuning_adapter(source_format, tmp_path):
    """HF's ONLY_SOURCE_SHARED: P is the source prompt, U and V fresh, so P_k = source ⊙ (u_k v_kᵀ) at init."""
    if source_format == "hf-peft":
        config = peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
        source = peft.get_peft_model(tiny("llama"), config)
        source.save_pretrained(tmp_path)
        prompt = source.prompt_encoder["default"].embedding.weight.detach()
    else:
        source = get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=4))
        source.save_pretrained(tmp_path, format=source_format)
        prompt = source.adapter_state_dict()["prompt_embeddings"].detach()
    config = MultitaskPromptConfig(num_virtual_tokens=4, num_tasks=2, prompt_tuning_init="from_prompt",
                                   init_adapter_path=str(tmp_path))
    model = get_peft_model(tiny("llama"), config)
    a = adapter_of(model)
    torch.testing.assert_close(a.embedding.weight.detach(), prompt)
    with torch.no_grad():
        out = a.prompt(2, task_ids=torch.tensor([0, 1]))
        for t in (0, 1):
            u, v = a.prefix_task_cols[t, :, 0], a.prefix_task_rows[t, 0]  # rank 1: U_k V_k = u vᵀ
            torch.testing.assert_close(out[t], prompt * torch.outer(u, v))
    assert a.prefix_task_cols.std() < 0.05, "U and V start at PEFT's small random scale"


def test_text_init_as_prompt_tuning():
    base = tiny("llama")
    table = base.get_input_embeddings().weight
    model = get_peft_model(base, MultitaskPromptConfig(num_virtual_tokens=5, prompt_tuning_init="text",
                                                       init_token_ids=[7, 9]))
    torch.testing.assert_close(adapter_of(model).embedding.weight, table[[7, 9, 7, 9, 7]])


def test_from_task_and_from_average(tmp_path):
    source = get_peft_model(tiny("llama"), MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=3, num_ranks=2))
    scramble(adapter_of(source))
    source.save_pretrained(tmp_path)
    s = {k: v.detach() for k, v in source.adapter_state_dict().items()}

    def start(init, **kw):
        config = MultitaskPromptConfig(num_virtual_tokens=3, num_tasks=2, num_ranks=2, prompt_tuning_init=init,
                                       init_adapter_path=str(tmp_path), **kw)
        return {k: v.detach() for k, v in get_peft_model(tiny("llama"), config).adapter_state_dict().items()}

    exact = start("from_task", init_task=2)
    torch.testing.assert_close(exact["prompt_embeddings"], s["prompt_embeddings"])
    for k in ("prefix_task_cols", "prefix_task_rows"):
        torch.testing.assert_close(exact[k], s[k][2].expand(2, -1, -1))  # task 2 starts every task here
    average = start("from_average")
    for k in ("prefix_task_cols", "prefix_task_rows"):
        torch.testing.assert_close(average[k], s[k].mean(0).expand(2, -1, -1))
    with pytest.raises(ConfigError, match="init_task=5 but .* has 3 tasks"):
        start("from_task", init_task=5)


def test_init_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs init_adapter_path"):
        MultitaskPromptConfig(prompt_tuning_init="from_prompt")
    with pytest.raises(ConfigError, match="prompt_tuning_init must be one of"):
        MultitaskPromptConfig(prompt_tuning_init="EXACT_SOURCE_TASK")
    with pytest.raises(ConfigError, match="num_tasks must be a positive int"):
        MultitaskPromptConfig(num_tasks=0)
    get_peft_model(tiny("llama"), PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"prompt_embeddings of .* shape \(4, 32\), this adapter needs \(5, 32\)"):
        get_peft_model(tiny("llama"), MultitaskPromptConfig(num_virtual_tokens=5, prompt_tuning_init="from_prompt",
                                                            init_adapter_path=str(tmp_path)))
    with pytest.raises(AdapterLoadError, match="needs a multitask adapter.*use 'from_prompt'"):
        get_peft_model(tiny("llama"), MultitaskPromptConfig(num_virtual_tokens=4, prompt_tuning_init="from_task",
                                                            init_adapter_path=str(tmp_path)))
    with pytest.raises(AdapterLoadError, match="init_adapter_path: .* does not exist"):
        get_peft_model(tiny("llama"), MultitaskPromptConfig(prompt_tuning_init="from_prompt",
                                                            init_adapter_path=str(tmp_path / "missing")))


def two_task_rows(n, seed=0):
    # Task 0: always predict token 7; task 1: always 9. Rows alternate between the tasks.
    ids = torch.randint(3, 50, (n, 10), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": row, "labels": [(7, 9)[i % 2]] * 10, "task_ids": i % 2} for i, row in enumerate(ids)]


def collate_tasks(rows, swap=False):
    task_ids = torch.tensor([1 - r["task_ids"] if swap else r["task_ids"] for r in rows])
    return {**collate(rows, pad_id=0), "task_ids": task_ids}


def test_multitask_learns_two_tasks():
    torch.manual_seed(0)
    base = tiny("llama", "causal-lm", seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(10)  # a head that can express a confident prediction (see test_ptuning.py)
    model = get_peft_model(base, MultitaskPromptConfig(num_virtual_tokens=4, num_tasks=2))
    args = TrainArgs(steps=30, batch_size=8, lr=0.1, progress=False)
    losses = train(model, two_task_rows(240), args=args, collate_fn=collate_tasks).losses
    last = sum(losses[-5:]) / 5
    assert last < 0.7 * losses[0], f"loss did not fall clearly: {losses[0]:.3f} -> {last:.3f}"
    with torch.no_grad():  # the tasks learned different prompts: swapping the ids hurts
        right = model(**collate_tasks(two_task_rows(8, seed=1))).loss
        swapped = model(**collate_tasks(two_task_rows(8, seed=1), swap=True)).loss
    assert swapped > right + 1.0, (right.item(), swapped.item())
