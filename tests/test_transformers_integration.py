"""memfit.integrations.transformers: a plan as the HF Trainer's arguments, and the Trainer's memory counted.

A tiny GPT-2 (2 layers, 32 wide, vocabulary 64, 16 tokens) on CPU, its dropout off so that two training loops
can be compared weight for weight. Budgets are chosen from its estimates: 1.70e6 bytes fits micro-batch 8 and
not 9 (a batch of 16 is 8 x 2, which the HF Trainer runs as planned); 1.25e6 fits 5 and not 6 (a batch of 24 is
planned as 5 x 4 + 4, which it cannot run).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import memfit  # noqa: E402
from memfit.integrations import transformers as hf  # noqa: E402
from memfit.integrations.transformers import (MemfitTrainerCallback, plan_training_arguments,  # noqa: E402
                                              training_config, training_workload)

T = 16  # tokens per sample
EVEN, UNEVEN = 1_700_000, 1_250_000  # bytes; see the module docstring


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The HF loop on two busy cores: intra-op threads only oversubscribe them (a tiny step takes 1 s instead of 0.1 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)


def gpt2(n_layer: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def arguments(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                  lr_scheduler_type="constant", learning_rate=1e-2, weight_decay=0.1, max_steps=3, logging_steps=1,
                  train_sampling_strategy="sequential", dataloader_drop_last=True, seed=0)
    return transformers.TrainingArguments(**{**values, **overrides})


def samples(n: int, *, padded: bool = False):
    ids = torch.randint(0, 64, (n, T), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    if padded:  # a third of the rows end in 5 padding tokens: micro-batches of unequal token counts
        labels[::3, -5:] = -100
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


def batches(data, size):
    return [{k: torch.stack([d[k] for d in data[s:s + size]]) for k in data[0]} for s in range(0, len(data), size)]


def optimizer_state_bytes(model):
    # AdamW: two fp32 moments per parameter element and a 4-byte step counter per parameter tensor.
    return sum(8 * p.numel() + 4 for p in model.parameters())


def assert_same_weights(a, b):
    other = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert (p - other[name]).abs().max() <= 1e-6 * p.abs().max(), name


@pytest.fixture(scope="module")
def even(tmp_path_factory):
    model = gpt2()
    args = arguments(tmp_path_factory.mktemp("even"), per_device_train_batch_size=16)
    return model, args, plan_training_arguments(model, args, EVEN, seq_len=T)


@pytest.fixture(scope="module")
def watched(even):
    """Three steps of the even plan in the HF Trainer, counted by the callback."""
    model, _, planned = even
    model = copy.deepcopy(model)
    memory = MemfitTrainerCallback(planned)
    trainer = transformers.Trainer(model=model, args=planned.args, train_dataset=samples(48), callbacks=[memory])
    with memory:
        trainer.train()
    return model, trainer, memory


def test_an_expressible_plan_trains_in_the_hf_trainer_as_in_memfit_trainer(even):
    model, args, planned = even
    assert planned.config == planned.plan.config and planned.plan.accumulation == (8, 8) and planned.notes == ()
    assert (planned.args.per_device_train_batch_size, planned.args.gradient_accumulation_steps) == (8, 2)
    assert args.per_device_train_batch_size == 16 and planned.args is not args  # the user's arguments unchanged
    model = copy.deepcopy(model)
    start = copy.deepcopy(model)
    reference = memfit.Trainer(planned.workload, planned.plan, device="cpu", clip_grad_norm=args.max_grad_norm)
    data = samples(48)
    trainer = transformers.Trainer(model=model, args=planned.args, train_dataset=data)
    with memfit.simulate_budget(EVEN, model):  # the HF loop fits the plan's budget too
        trainer.train()
    results = [reference.step(batch) for batch in batches(data, 16)]
    # 128 tokens per micro-batch: memfit's provisional 1/items is exact, so the two loops agree to the last bit.
    assert_same_weights(model, reference.model)
    assert any((p != q).any() for p, q in zip(model.parameters(), start.parameters()))  # it trained
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx([r.loss for r in results], rel=1e-6)


def test_padding_is_weighted_by_the_tokens_the_hf_trainer_counts(tmp_path):
    # Unequal token counts per micro-batch: the HF Trainer divides every micro-batch's sum by the window's
    # num_items_in_batch, memfit by the logical batch's items. (It counts GPT2LMHeadModel's labels unshifted,
    # one more per row than the loss sums: memfit counts as it does.) SGD: AdamW would magnify last-bit
    # differences of gradients that are zero in exact arithmetic (the key bias's: softmax ignores it).
    model = gpt2()
    args = arguments(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=2, optim="sgd")
    reference = memfit.Trainer(training_workload(model, args, seq_len=T), memfit.Config(micro_batch=8), device="cpu",
                               clip_grad_norm=args.max_grad_norm)
    data = samples(48, padded=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    results = [reference.step(batch) for batch in batches(data, 16)]
    assert_same_weights(model, reference.model)
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == pytest.approx([r.loss for r in results],
                                                                                          rel=1e-6)
    assert results[0].items_tensor.item() == 16 * 16 - 6 * 5  # six padded rows in the first 16


def test_an_uneven_plan_becomes_equal_micro_batches_that_keep_the_batch_and_fit(tmp_path):
    model = gpt2()
    args = arguments(tmp_path, per_device_train_batch_size=24, auto_find_batch_size=True)
    before = args.to_dict()
    planned = plan_training_arguments(model, args, UNEVEN, seq_len=T)
    assert args.to_dict() == before  # a copy: the user's arguments are never changed
    assert planned.plan.accumulation == (5, 5, 5, 5, 4)
    assert (planned.args.per_device_train_batch_size, planned.args.gradient_accumulation_steps) == (4, 6)
    assert planned.args.auto_find_batch_size is False and planned.config == dataclasses.replace(
        planned.plan.config, micro_batch=4)
    assert "5 x 4 + 4" in planned.notes[0] and "4 x 6" in planned.notes[0] and "the same batch of 24" in planned.notes[0]
    assert "auto_find_batch_size turned off" in planned.notes[-1]

    def required(m):
        return memfit.estimate(planned.workload, memfit.Config(micro_batch=m), device="cpu", accumulation=2).required

    assert required(4) == planned.estimate.required <= UNEVEN < required(6)  # fits; the next divisor of 24 does not
    assert memfit.format_bytes(required(4)) in planned.notes[0]


def test_the_callback_reports_the_trackers_peak_against_the_plan(even, watched):
    model, _, planned = even
    trained, trainer, memory = watched
    # An independent count: a tracker entered with the Trainer's optimizer and never reset, over an identical run.
    seen = {}

    class Reference(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            seen["tracker"] = memfit.track(model, optimizer.optimizer).__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            seen["tracker"].__exit__(None, None, None)

    again = copy.deepcopy(model)
    transformers.Trainer(model=again, args=planned.args, train_dataset=samples(48), callbacks=[Reference()]).train()
    report = memory.report
    assert report["peak"] == seen["tracker"].peak == max(report["step_peaks"])
    assert report["at_peak"]["optimizer_state"] == optimizer_state_bytes(model)
    assert report["report"].peak == report["peak"] and len(report["step_peaks"]) == 3
    assert report["planned"] == planned.estimate.peak and report["budget"] == EVEN
    assert 0.98 * report["planned"] <= report["peak"] <= report["planned"]  # the plan covers the HF loop, closely
    last = trainer.state.log_history[-1]
    assert last["memfit/peak_bytes"] == report["peak"] and last["memfit/planned_bytes"] == planned.estimate.peak


def test_a_later_step_out_of_memory_is_explained(even, watched, tmp_path):
    model, _, planned = even
    first, second, _ = watched[2].report["step_peaks"]
    budget = (first + second) // 2  # the first step fits; the second, with AdamW's state, does not
    model = copy.deepcopy(model)
    memory = MemfitTrainerCallback(planned, budget=budget)
    trainer = transformers.Trainer(model=model, args=planned.args, train_dataset=samples(48), callbacks=[memory])
    with pytest.raises(memfit.OutOfMemory, match=r"at step 2, micro-step \d of 2 .*alive at the failure") as info:
        with memory:
            trainer.train()
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError) and "Simulated budget" in str(info.value.__cause__)
    failure = memory.failure
    assert failure["step"] == 2 and failure["live"]["optimizer_state"] == optimizer_state_bytes(model)
    assert sum(failure["live"].values()) <= budget
    advice = info.value.advice
    assert any("per_device_train_batch_size=4, gradient_accumulation_steps=4" in a for a in advice)
    assert any("bf16=True" in a for a in advice) and any("activation_checkpointing=True" in a for a in advice)
    assert "memfit planned micro-batch 8" in str(info.value)
    assert trainer.state.log_history[-1]["memfit/oom_step"] == 2
    why = info.value.explanation  # memfit.explain of the tracked steps, its fixes estimated on the Trainer's step
    assert why.budget == budget and sum(why.at_peak.values()) == why.peak and why.largest
    micro = next(f for f in why.fixes if f.lever.startswith("micro-batch "))
    assert micro.verified and micro.fits and why.batch_size == 16


def test_an_injected_out_of_memory_goes_through_the_explanation_seam(even, monkeypatch):
    model, _, planned = even
    model = copy.deepcopy(model)
    calls = []

    def fail_once(module, inputs):
        calls.append(1)
        if len(calls) == 3:  # the second step's first micro-step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    model.transformer.h[1].register_forward_pre_hook(fail_once)
    monkeypatch.setattr(hf, "explain_oom", lambda failure: f"explained: step {failure['step']} {failure['phase']}")
    memory = MemfitTrainerCallback(planned.plan)  # a memfit.Plan works too
    trainer = transformers.Trainer(model=model, args=planned.args, train_dataset=samples(48), callbacks=[memory])
    with pytest.raises(memfit.OutOfMemory, match=r"^explained: step 2 forward Try: ") as info:
        with memory:
            trainer.train()
    assert "injected" in memory.failure["error"] and memory.failure["micro_step"] == 1
    assert memory.failure["live"]["activations"] > 0  # the failed forward's layer 0, held by the traceback
    assert info.value.report.peak > 0 and info.value.fixes[-1].lever == "a larger budget or device"
    assert torch.utils._python_dispatch._get_current_dispatch_mode() is None  # the tracker is gone


def test_partial_checkpointing_becomes_every_n_layers_the_trainer_applies(tmp_path, monkeypatch):
    model = gpt2(n_layer=4)
    args = arguments(tmp_path, per_device_train_batch_size=8)
    layers = tuple(f"transformer.h.{i}" for i in range(4))
    real = hf.plan

    def first_two(*a, **k):  # the plan of a budget that needs 2 of the 4 layers checkpointed
        p = real(*a, **k)
        return dataclasses.replace(p, config=dataclasses.replace(p.config, checkpoint=layers[:2]))

    monkeypatch.setattr(hf, "plan", first_two)
    planned = plan_training_arguments(model, args, "64MiB", seq_len=T)
    # The fewest layers the Trainer can checkpoint, at least 2: layer indices divisible by every_n_layers=3.
    assert planned.config.checkpoint == (layers[0], layers[3])
    assert planned.args.activation_checkpointing is True
    assert planned.args.activation_checkpointing_kwargs == {"use_reentrant": False, "every_n_layers": 3}
    assert "checkpoint 2 (every_n_layers=3)" in planned.notes[0]
    assert planned.args.gradient_checkpointing is True  # the deprecated name mirrors the new one
    assert planned.estimate.config == planned.config and planned.estimate.required <= 64 << 20
    # The layers the HF Trainer checkpoints with these arguments are the ones planned.
    transformers.Trainer(model=model, args=dataclasses.replace(planned.args, max_steps=1), train_dataset=samples(8)).train()
    assert tuple(n for n in layers if model.get_submodule(n).gradient_checkpointing) == planned.config.checkpoint
    assert training_config(planned.args, model) == planned.config


def test_a_true_precision_comes_with_the_dtype_to_cast_the_model_to(tmp_path):
    model = gpt2()
    planned = plan_training_arguments(model, arguments(tmp_path, per_device_train_batch_size=8, bf16=True),
                                      "64MiB", seq_len=T, precisions=("bf16-true",))
    assert planned.config.precision == "bf16-true" and planned.dtype is torch.bfloat16
    assert planned.args.bf16 is False and planned.args.fp16 is False
    assert any("model.to(torch.bfloat16)" in note for note in planned.notes)
    assert next(model.parameters()).dtype is torch.float32  # planning never casts your model
    assert training_config(planned.args, model.to(planned.dtype)) == planned.config


def test_a_sample_batch_is_repeated_to_any_micro_batch(tmp_path):
    model, args = gpt2(), arguments(tmp_path)
    sample = batches(samples(3, padded=True), 3)[0]
    workload = training_workload(model, args, sample=sample)
    five = workload.batch(5)
    assert torch.equal(five["labels"], sample["labels"][[0, 1, 2, 0, 1]]) and five["input_ids"].dtype == torch.long
    # Only shapes and dtypes take memory: the sample's step is the random tokens' step, byte for byte.
    config = memfit.Config(micro_batch=4)
    assert memfit.estimate(workload, config).peak == memfit.estimate(training_workload(model, args, seq_len=T), config).peak


def test_a_deep_model_estimated_on_a_cut_copy_keeps_the_trainers_optimizer_groups(tmp_path):
    # memfit traces 8 identical blocks cut to a few: the optimizer factory gets fewer parameters than the model has,
    # and must still group them as Trainer.create_optimizer does (foreach AdamW on CUDA holds one group at a time).
    args = arguments(tmp_path, optim="adamw_torch")
    workload = training_workload(gpt2(n_layer=8), args, seq_len=T)
    cut = memfit.estimate(workload, memfit.Config(micro_batch=2), device="cuda")
    full = memfit.estimate(workload, memfit.Config(micro_batch=2), device="cuda", extrapolate=False)
    assert "extrapolated" in cut.notes[0] and not full.notes
    assert (cut.peak, cut.at_peak, cut.phases) == (full.peak, full.at_peak, full.phases)


def test_the_callback_needs_its_with_block(even):
    model, _, planned = even
    trainer = transformers.Trainer(model=copy.deepcopy(model), args=planned.args, train_dataset=samples(48),
                                   callbacks=[MemfitTrainerCallback(planned)])
    with pytest.raises(memfit.UsageError, match=r"`with callback: trainer.train\(\)`"):
        trainer.train()


@pytest.mark.parametrize("call, match", [
    (lambda m, a: plan_training_arguments(m, {"learning_rate": 1e-3}, EVEN, seq_len=T),
     "args must be transformers.TrainingArguments, got dict"),
    (lambda m, a: plan_training_arguments("gpt2", a, EVEN, seq_len=T), r"model must be a torch.nn.Module \(a transformers PreTrainedModel\), got str"),
    (lambda m, a: plan_training_arguments(m, a, EVEN), r"give seq_len= .* or sample="),
    (lambda m, a: plan_training_arguments(m, a, EVEN, seq_len=T, sample={"input_ids": torch.ones(2, T)}),
     "not both"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, seq_len=64), "seq_len 64 exceeds the model's 32 positions"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, seq_len=0), "seq_len must be a positive int"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, sample={"input_ids": torch.ones(2, T, dtype=torch.long)}),
     "sample= has no 'labels' \\(its keys: input_ids\\)"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, sample={"input_ids": torch.ones(2, T), "labels": torch.ones(3, T)}),
     "sample= must be one batch"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, sample=[torch.ones(2, T)]), "sample= must be one batch"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, sample={"input_ids": torch.ones(0, T, dtype=torch.long),
                                                              "labels": torch.ones(0, T, dtype=torch.long)}),
     r"^sample= has 0 rows \(its tensors' shapes: \(0, 16\), \(0, 16\)\); give one batch as your data collator "
     r"yields it, with at least one sample$"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, seq_len=T, batch_size=0), "batch_size must be a positive int"),
    (lambda m, a: plan_training_arguments(m, a, EVEN, seq_len=T, precisions=("bf16",)), "precision 'bf16' is not one"),
    (lambda m, a: plan_training_arguments(m, dataclasses.replace(a, optim="galore_adamw"), EVEN, seq_len=T),
     "the HF Trainer cannot build optim='galore_adamw' here: You need to install `galore_torch`"),
    (lambda m, a: plan_training_arguments(transformers.GPT2ForSequenceClassification(m.config), a, EVEN, seq_len=T),
     "GPT2ForSequenceClassification is not a causal LM"),
    (lambda m, a: MemfitTrainerCallback(plan="8x2"), "takes what plan_training_arguments or memfit.plan returns, got str"),
])
def test_bad_inputs_are_usage_errors(tmp_path, call, match):
    with pytest.raises(memfit.UsageError, match=match):
        call(gpt2(), arguments(tmp_path))


def test_an_optimizer_built_from_the_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(transformers.Trainer, "get_optimizer_cls_and_kwargs",
                        staticmethod(lambda args, model: (torch.optim.AdamW, {"model": model, "lr": 1e-3})))
    with pytest.raises(memfit.UsageError, match="builds its optimizer from the model itself"):
        plan_training_arguments(gpt2(), arguments(tmp_path), EVEN, seq_len=T)
