"""Which rows an SFT stage trains on: own and replayed rows, and with keep_solved only those its
starting model answers correctly, found by a real vLLM engine on a local Ray cluster."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from kimivl_rl.config import load_config
from kimivl_rl.prepare import with_absolute_paths
from kimivl_rl.reward.extract import extract_answer, split_thinking
from kimivl_rl.sft.sources import ensure_solved_rows, stage_examples

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 12
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 1), (2, 9), (8, 8)]
QUESTIONS = [f"What is {a} + {b}?" for a, b in PAIRS]
NEVER = "an answer no model says"


def teach(model_dir: Path, out_dir: Path, answers: dict[str, str]) -> Path:
    """The tiny model trained (plain torch, full-sequence loss) until it answers each question
    with its ``\\boxed{}`` answer: a starting model that solves known rows. Until, not for a
    fixed number of steps: how soon it memorises moves with the CPU's float rounding."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": f"\\boxed{{{a}}}"}]
             for q, a in answers.items()]
    batch = processor(text=[processor.apply_chat_template(t, tokenize=False) for t in turns],
                      return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    answer_tokens = _answer_mask(processor, turns, batch["attention_mask"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for step in range(2000):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 49 and _predicts(model, batch, answer_tokens):
            break
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _answer_mask(processor, turns: list, attention_mask: torch.Tensor) -> torch.Tensor:
    """True at each row's assistant tokens (its answer and the turn's end)."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for row, turn in enumerate(turns):
        prompt = processor.apply_chat_template(turn[:1], tokenize=False, add_generation_prompt=True)
        mask[row, len(processor(text=[prompt])["input_ids"][0]):int(attention_mask[row].sum())] = True
    return mask


def _predicts(model, batch, answer_tokens: torch.Tensor) -> bool:
    """Whether every answer token is the model's most likely next token (so greedy decoding
    writes the answer)."""
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    hits = predicted[:, :-1] == batch["input_ids"][:, 1:]
    return bool(hits[answer_tokens[:, 1:]].all())


def hf_greedy_answers(model_dir: Path) -> list[str | None]:
    """The model's greedy answer to each question, from transformers' ``generate``: an engine
    independent of the vLLM one the filter uses."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    answers = []
    for question in QUESTIONS:
        prompt = processor.apply_chat_template([{"role": "user", "content": question}],
                                               tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(extract_answer(split_thinking(text)[1]).answer)
    return answers


def write_rows(path: Path, references: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for question, reference in zip(QUESTIONS, references):
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": "\\boxed{0}"}],
                                "answer": reference}) + "\n")


def sources_cfg(tmp_path: Path, model_dir: Path, *overrides: str):
    return with_absolute_paths(load_config("configs/tiny.yaml", [
        f"model.path={model_dir}", "model.init_if_missing=false", f"data.dir={tmp_path / 'data'}",
        "data.build_if_missing=false", f"output.dir={tmp_path / 'out'}",
        "sft.long_cot.train_file=own.jsonl", "sft.long_cot.replay_file=replay.jsonl",
        "sft.long_cot.replay_examples=4", "sft.long_cot.replay_system_prompt=Answer directly.",
        "sft.long_cot.keep_solved=true",
        f"sft.eval_max_new_tokens={MAX_NEW_TOKENS}", *overrides]))


def test_keep_solved_keeps_exactly_the_rows_the_starting_model_answers(tmp_path, tiny_model_dir,
                                                                       ray_cluster):
    sums = [str(a + b) for a, b in PAIRS]
    model_dir = teach(tiny_model_dir, tmp_path / "taught", dict(zip(QUESTIONS, sums)))
    assert hf_greedy_answers(model_dir) == sums
    own = [s if i % 2 == 0 else str(int(s) + 1) for i, s in enumerate(sums)]  # 0, 2, 4 solved
    cfg = sources_cfg(tmp_path, model_dir, "sft.long_cot.unsolved_fraction=0.5")
    write_rows(tmp_path / "data" / "own.jsonl", own)
    write_rows(tmp_path / "data" / "replay.jsonl", [NEVER] * len(QUESTIONS))  # 6, 4 replayed
    directory = tmp_path / "out" / "sft_long_cot"
    directory.mkdir(parents=True)

    counts = ensure_solved_rows(cfg, "long_cot", str(model_dir))

    # Solved: rows 0, 2, 4; unsolved 1, 3, 5, of which a half (the 2nd) is kept: row 3.
    assert counts == {"file": "own.jsonl", "rows": 6, "solved": 3, "kept": 4}
    examples = stage_examples(cfg, "long_cot")
    kept = [(Path(ex.source.rsplit(":", 1)[0]).name, int(ex.source.rsplit(":", 1)[1]))
            for ex in examples]
    # Replayed rows are the previous stage's answers: all kept, under their system prompt.
    assert kept == [("own.jsonl", line) for line in (1, 3, 4, 5)] + \
                   [("replay.jsonl", line) for line in (1, 2, 3, 4)]
    assert all(ex.messages[0] == {"role": "system", "content": cfg.sft.long_cot.replay_system_prompt}
               for ex in examples[4:])
    # A resumed stage reads the file back instead of asking the model again.
    stored = json.loads((directory / "solved_rows.json").read_text())
    stored["counts"]["kept"] = -1
    (directory / "solved_rows.json").write_text(json.dumps(stored))
    assert ensure_solved_rows(cfg, "long_cot", str(model_dir))["kept"] == -1
    # Another fraction (or starting model) asks the model again: now every unsolved row is kept.
    everything = sources_cfg(tmp_path, model_dir, "sft.long_cot.unsolved_fraction=1.0")
    assert ensure_solved_rows(everything, "long_cot", str(model_dir))["kept"] == 6


def test_keep_solved_with_nothing_solved_says_so_before_training(tmp_path, tiny_model_dir,
                                                               ray_cluster):
    cfg = sources_cfg(tmp_path, tiny_model_dir)
    for name in ("own.jsonl", "replay.jsonl"):
        write_rows(tmp_path / "data" / name, [NEVER] * len(QUESTIONS))
    directory = tmp_path / "out" / "sft_long_cot"
    directory.mkdir(parents=True)
    with pytest.raises(ValueError, match="answers none of the 6 rows of own.jsonl correctly"):
        ensure_solved_rows(cfg, "long_cot", str(tiny_model_dir))
    assert not (directory / "solved_rows.json").exists()
