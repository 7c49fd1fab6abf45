"""SFT pieces without Ray: answer-only labels, isolated packing, phases and their schedules."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from kimivl_rl.config import load_config
from kimivl_rl.config.schema import PhaseConfig
from kimivl_rl.data.rows import Example
from kimivl_rl.models.families import family_of
from kimivl_rl.models.loading import language_model, load_policy, use_language_model_attention
from kimivl_rl.models.packed_attention import PACKED_SDPA, example_lengths
from kimivl_rl.training.packing import IGNORE_INDEX, collate_pack, fit_to_length, plan_packs
from kimivl_rl.sft.encode import encode_example
from kimivl_rl.sft.plan import build_plan
from kimivl_rl.sft.schedule import phase_lr, stage_lr
from kimivl_rl.sft.sources import rows_to_keep, with_system_prompt
from kimivl_rl.sft.trainer import answer_loss_sum


def image(colour) -> Image.Image:
    img = Image.new("RGB", (112, 112), "white")
    img.paste(colour, (30, 30, 60, 60))
    return img


def example(messages, images=(), source="test:1") -> Example:
    return Example(messages=messages, images=list(images), answer=None, difficulty=None,
                   pass_rate=None, source=source)


MULTI_TURN = example([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
    {"role": "assistant", "content": "\\boxed{red}"},
    {"role": "user", "content": "And 2 + 3?"},
    {"role": "assistant", "reasoning_content": "First I will add. Wait, 5.", "content": "\\boxed{5}"},
], [image((220, 30, 30))])


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


def labelled_runs(encoded, tokenizer) -> list[str]:
    """The labelled tokens, decoded run by run."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_loss_only_on_every_assistant_turn_and_its_closing_token(policy):
    model, processor = policy
    encoded = encode_example(MULTI_TURN, processor, family_of(model))
    assert labelled_runs(encoded, processor.tokenizer) == [
        "\\boxed{red}<|im_end|>", "<think>First I will add. Wait, 5.</think>\\boxed{5}<|im_end|>"]
    image_id = model.config.image_token_id
    assert int((encoded.input_ids == image_id).sum()) == 16
    assert not (encoded.labels == image_id).any()
    labelled = encoded.labels != IGNORE_INDEX
    assert torch.equal(encoded.labels[labelled], encoded.input_ids[labelled])


def test_replayed_rows_get_the_replay_system_prompt_in_place_of_their_own(policy):
    model, processor = policy
    replayed = with_system_prompt(MULTI_TURN, "Answer directly.")
    assert [m["role"] for m in replayed.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert replayed.messages[0] == {"role": "system", "content": "Answer directly."}
    assert MULTI_TURN.messages[0]["content"] == "Be brief."  # the loaded row is not changed
    assert with_system_prompt(MULTI_TURN, "") is MULTI_TURN
    encoded = encode_example(replayed, processor, family_of(model))
    text = processor.tokenizer.decode(encoded.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nAnswer directly.<|im_end|>") and "Be brief." not in text
    assert labelled_runs(encoded, processor.tokenizer) == labelled_runs(
        encode_example(MULTI_TURN, processor, family_of(model)), processor.tokenizer)


def test_positions_restart_per_example_and_follow_mrope(policy):
    model, processor = policy
    encoded = encode_example(MULTI_TURN, processor, family_of(model))
    text_row, mrope = encoded.position_ids[0], encoded.position_ids[1:]
    assert torch.equal(text_row, torch.arange(len(encoded)))
    image_at = (encoded.input_ids == model.config.image_token_id).nonzero()[:, 0]
    # Inside the image the height/width rows walk the 4x4 merged grid, time stays put.
    first = int(image_at[0])
    assert mrope[0, image_at].unique().tolist() == [first]
    assert mrope[1, image_at].tolist() == [first + r for r in range(4) for _ in range(4)]
    assert mrope[2, image_at].tolist() == [first + c for _ in range(4) for c in range(4)]


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, packs):
    model.zero_grad()
    total = sum(answer_loss_sum(model, collate_pack(pack, family_of(model))) for pack in packs)
    total.backward()
    return total.item(), grads_of(model)


@pytest.fixture(params=["sdpa", PACKED_SDPA])
def attention(request, policy):
    """The language model's attention for one test: SDPA with transformers' packed mask, or
    SDPA on each packed example; the module-scoped model gets SDPA back afterwards."""
    use_language_model_attention(policy[0], request.param)
    yield request.param
    use_language_model_attention(policy[0], "sdpa")


def test_example_lengths_split_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]])
    assert example_lengths(positions) == [3, 2, 4, 1]
    assert example_lengths(torch.arange(7)[None]) == [7]
    # A jump that is not a restart to 0 also starts an example, as in transformers' rule.
    assert example_lengths(torch.tensor([[0, 1, 5, 6]])) == [2, 2]


def assert_close_after_reordering(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """Equal up to float32 rounding of sums taken in another order: a gradient element sums
    ``terms`` per-token products, and reassociating such a sum moves it by about
    ``sqrt(terms) * eps`` times the size of its terms, which the tensor's largest element bounds
    from below; 4x that is the tolerance. A real difference (a token seeing another example) is
    of the order of the gradient itself, about 1e6 times larger."""
    eps = torch.finfo(torch.float32).eps
    atol = 4 * math.sqrt(terms) * eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


def test_packed_batch_equals_examples_one_at_a_time(policy, attention):
    """Text and image examples packed together give the same loss and gradients."""
    model, processor = policy
    assert language_model(model).config._attn_implementation == attention
    examples = [
        MULTI_TURN,
        example([{"role": "user", "content": "What is 4 + 4?"},
                 {"role": "assistant", "content": "\\boxed{8}"}]),
        example([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]},
                 {"role": "assistant", "reasoning_content": "Let me check.", "content": "\\boxed{1}"}],
                [image((40, 70, 220))]),
    ]
    encoded = [encode_example(ex, processor, family_of(model)) for ex in examples]
    packed_loss, packed_grads = loss_and_grads(model, [encoded])
    single_loss, single_grads = loss_and_grads(model, [[e] for e in encoded])
    assert packed_loss == pytest.approx(single_loss, rel=1e-5)
    assert packed_grads.keys() == single_grads.keys()
    for name in packed_grads:
        assert_close_after_reordering(packed_grads[name], single_grads[name],
                                      terms=sum(len(e) for e in encoded))
    # Without restarting positions the examples would see each other: the outputs change.
    isolated = collate_pack(encoded, family_of(model))
    leaky = dict(isolated, position_ids=torch.arange(isolated["input_ids"].shape[1]).expand(4, 1, -1))
    with torch.no_grad():
        first = len(encoded[0])
        kept = {k: v for k, v in isolated.items() if k != "labels"}
        seen = {k: v for k, v in leaky.items() if k != "labels"}
        assert not torch.allclose(model(**kept).logits[0, first:], model(**seen).logits[0, first:],
                                  atol=1e-4)


def test_pack_keeps_each_examples_images_in_order(policy):
    model, processor = policy
    red = encode_example(example([{"role": "user", "content": [{"type": "image"}]},
                                  {"role": "assistant", "content": "a"}], [image((220, 30, 30))]),
                         processor, family_of(model))
    blue = encode_example(example([{"role": "user", "content": [{"type": "image"}]},
                                   {"role": "assistant", "content": "b"}], [image((40, 70, 220))]),
                          processor, family_of(model))
    batch = collate_pack([red, blue, red], family_of(model))
    # red's image tensor is packed once; image_sources gives each image's row in order
    assert torch.equal(batch["pixel_values"], torch.cat([red.pixel_values, blue.pixel_values]))
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 2
    assert batch["image_sources"].tolist() == [0, 1, 0]
    copied = collate_pack([red, blue, replace(red, pixel_values=red.pixel_values.clone())],
                          family_of(model))
    assert torch.equal(copied["pixel_values"], torch.cat([red.pixel_values, blue.pixel_values,
                                                          red.pixel_values]))
    assert copied["image_grid_thw"].tolist() == [[1, 8, 8]] * 3 and "image_sources" not in copied
    starts = (batch["position_ids"][0, 0] == 0).nonzero()[:, 0].tolist()
    assert starts == [0, len(red), len(red) + len(blue)]
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()


def test_first_fit_packing_respects_length_and_uses_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 6, 1]
    packs = plan_packs(lengths, max_len=10, seed=0)
    assert sorted(i for pack in packs for i in pack) == list(range(8))
    assert all(sum(lengths[i] for i in pack) <= 10 for pack in packs)
    assert len(packs) == math.ceil(sum(lengths) / 10)  # 41 tokens fit in 5 packs here
    assert plan_packs(lengths, 10, seed=0) == packs
    assert plan_packs(lengths, 10, seed=1) != packs


def test_overlong_examples_are_truncated_or_dropped(policy):
    model, processor = policy
    image_id = model.config.image_token_id
    text = encode_example(example([{"role": "user", "content": "Say it."},
                                   {"role": "assistant", "content": "one two three four five"}]),
                          processor, family_of(model))
    with_image = encode_example(MULTI_TURN, processor, family_of(model))
    first_answer = int((with_image.labels != IGNORE_INDEX).nonzero()[0])
    inside_image = int((with_image.input_ids == image_id).nonzero()[0]) + 5

    def fit(ex, limit, overlong):
        items = [ex]
        return fit_to_length(items, limit, overlong, image_id), items[0]

    report, cut = fit(text, len(text) - 3, "truncate")
    assert (report.kept, report.truncated, report.dropped) == ([0], 1, 0)
    assert torch.equal(cut.input_ids, text.input_ids[:-3]) and cut.position_ids.shape[1] == len(text) - 3
    assert fit(text, len(text) - 3, "drop")[0].dropped == 1
    report, cut = fit(with_image, first_answer + 2, "truncate")
    assert report.truncated == 1 and len(cut) == first_answer + 2  # the image stays whole
    assert fit(with_image, inside_image, "truncate")[0].dropped == 1  # never cut an image
    assert fit(text, 3, "truncate")[0].dropped == 1  # nothing of the answer would be left


def test_phase_schedule_values():
    phase = PhaseConfig(max_seq_len=64, lr_peak=1e-3, lr_final=1e-4, warmup_steps=2, schedule="cosine")
    lrs = [phase_lr(phase, s, 5) for s in range(5)]
    # warm-up 1/2, 2/2 of peak; then cosine over 3 steps: peak, midpoint, final.
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4])
    linear = PhaseConfig(lr_peak=1.0, lr_final=0.0, warmup_steps=0, schedule="linear")
    assert [phase_lr(linear, s, 3) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    second = PhaseConfig(lr_peak=1e-5, lr_final=1e-6, warmup_steps=1)
    # The second phase warms up again from its own peak (the paper's 128K re-warm-up).
    assert [stage_lr([phase, second], [5, 3], s) for s in (4, 5, 7)] == pytest.approx([1e-4, 1e-5, 1e-6])


def test_plan_is_shared_by_ranks_and_counts_global_tokens(policy):
    model, processor = policy
    encoded = [encode_example(ex, processor, family_of(model)) for ex in [MULTI_TURN] * 6]
    phases = [PhaseConfig(max_seq_len=2 * len(encoded[0]), epochs=1.5)]
    plan = build_plan(encoded, phases, packs_per_step=2, seed=3, overlong="drop",
                      image_token_id=model.config.image_token_id)
    # 6 examples, 2 per pack: 3 packs per epoch, 1.5 epochs -> 3 + 2 packs -> 2 steps of 2.
    assert plan.report[0]["packs"] == 5 and plan.report[0]["leftover_packs"] == 1
    assert len(plan.steps) == 2
    per_example = encoded[0].num_label_tokens  # its first token is not labelled anyway
    assert all(step.label_tokens == 4 * per_example for step in plan.steps)
    again = build_plan(encoded, phases, 2, seed=3, overlong="drop",
                       image_token_id=model.config.image_token_id)
    assert [s.packs for s in again.steps] == [s.packs for s in plan.steps]


def test_rows_to_keep_keeps_the_solved_and_every_nth_unsolved_row():
    solved = [True, False, False, False, True] + [False] * 17
    # unsolved rows are 1, 2, 3, 5, 6, ...: the 10th and the 20th of them are kept
    assert rows_to_keep(solved, 0.1) == [0, 4, 11, 21]
    assert rows_to_keep([False] * 3000, 0.1) == list(range(9, 3000, 10))  # 300, exactly
    assert rows_to_keep(solved, 0.0) == [0, 4]
    assert rows_to_keep(solved, 1.0) == list(range(len(solved)))
    assert rows_to_keep([], 0.5) == []


def test_a_cpu_policy_trains_with_packed_sdpa_and_generates_with_sdpa(tiny_model_dir):
    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    trained, _ = load_policy(str(tiny_model_dir), cfg, training=True)
    assert language_model(trained).config._attn_implementation == PACKED_SDPA
    assert trained.config.vision_config._attn_implementation == "sdpa"  # images keep their own
    generating, _ = load_policy(str(tiny_model_dir), cfg, training=False)
    assert language_model(generating).config._attn_implementation == "sdpa"  # KV cache, padding
