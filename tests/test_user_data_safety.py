"""A user's files are never deleted or overwritten: every command that writes, pointed at a
user's own directory (as data.dir, output.dir or an --out target), stops before it starts,
names the setting and the path, and leaves every byte as it was."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kimivl_rl.data.build import BuildSpec, build_dataset, ensure_dataset
from kimivl_rl.infra.ownership import (OUTPUT_MARKER, SHA_KEY, NotOursError, check_replaceable_file,
                                       claim_output_dir, sha256_of, sidecar_path)

TINY = ["data.joint_sft_examples=2", "data.long_cot_examples=2", "data.rl_prompts=2",
        "data.eval_examples=2"]
TINY_SPEC = BuildSpec(joint_sft_examples=2, long_cot_examples=2, rl_prompts=2, eval_examples=2)


def kimivl(*args):
    return subprocess.run([sys.executable, "-m", "kimivl_rl.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def snapshot(root: Path) -> dict[str, str]:
    """Every directory and the sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def tmp(tmp_path) -> Path:
    return tmp_path.resolve()  # error messages name resolved paths


@pytest.fixture
def user_dir(tmp) -> Path:
    """A user's data directory in the README's row format, an image, and an unrelated file."""
    mine = tmp / "mydata"
    (mine / "images").mkdir(parents=True)
    Image.new("RGB", (28, 28), "red").save(mine / "images" / "0001.png")
    image_row = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                           {"type": "text", "text": "How many red squares?"}]},
                              {"role": "assistant", "content": "\\boxed{1}"}],
                 "images": ["images/0001.png"], "answer": "1"}
    text_row = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                             {"role": "assistant", "content": "\\boxed{5}"}], "answer": "5"}
    rows = "".join(json.dumps(r) + "\n" for r in (image_row, text_row))
    (mine / "sft.jsonl").write_text(rows)
    (mine / "rl.jsonl").write_text(rows)
    (mine / "notes.txt").write_text("my own notes\n")
    return mine


def commands(tmp: Path, mine: Path) -> list[tuple[list, str, Path]]:
    """(argv, the setting the refusal must name, the path it must name) for every writing
    command aimed at ``mine``."""
    config = "configs/tiny.yaml"
    elsewhere = [f"model.path={tmp}/model", f"output.dir={tmp}/out"]
    as_data = [f"data.dir={mine}", *elsewhere, "sft.joint.train_file=sft.jsonl",
               "sft.joint.eval_file=rl.jsonl"]  # the measured case: own files, builder left on
    as_output = [f"data.dir={mine}", "data.build_if_missing=false", f"model.path={tmp}/model",
                 f"output.dir={mine}"]
    kept_data = [f"data.dir={mine}", "data.build_if_missing=false", *elsewhere]
    return [
        (["prepare", config, *as_data], "data.dir", mine),
        (["data", "build", config, *as_data], "data.dir", mine),
        (["data", "build", config, "--out", mine], "--out", mine),
        (["sft", config, "--stage", "joint", *as_data], "data.dir", mine),
        (["rl", config, *as_data], "data.dir", mine),
        (["run", config, *as_data], "data.dir", mine),
        (["data", "label-difficulty", config, *as_data, "--input", mine / "rl.jsonl"], "data.dir", mine),
        (["sft", config, "--stage", "joint", *as_output], "output.dir", mine),
        (["rl", config, *as_output], "output.dir", mine),
        (["run", config, *as_output], "output.dir", mine),
        (["data", "label-difficulty", config, *kept_data, "--input", mine / "rl.jsonl",
          "--out", mine / "sft.jsonl"], "--out", mine / "sft.jsonl"),
        (["data", "build-long-cot", config, *kept_data, "--teacher", tmp / "teacher",
          "--prompts", mine / "rl.jsonl", "--out", mine / "sft.jsonl"], "--out", mine / "sft.jsonl"),
        (["model", "init", "--out", mine], "--out", mine),
        (["eval", config, *kept_data, "--model", tmp / "model", "--out", mine / "rl.jsonl"],
         "--out", mine / "rl.jsonl"),
        (["eval", config, *as_output, "--model", tmp / "model"], "output.dir", mine),
    ]


def test_every_writing_command_leaves_a_users_directory_untouched(tmp, user_dir):
    before = snapshot(tmp)  # the user's directory and everything beside it (staging, outputs)
    for argv, setting, path in commands(tmp, user_dir):
        result = kimivl(*argv)
        assert result.returncode == 2, (argv, result.stdout, result.stderr[-2000:])
        assert f"kimivl-rl: error: {setting} {path} " in result.stderr, (argv, result.stderr[-2000:])
        assert "nothing was changed" in result.stderr and "Traceback" not in result.stderr
        assert snapshot(tmp) == before, argv


def test_the_refusal_says_how_to_train_on_own_files(tmp, user_dir):
    err = kimivl("sft", "configs/tiny.yaml", "--stage", "joint", f"data.dir={user_dir}",
                 f"output.dir={tmp}/out", f"model.path={tmp}/model").stderr
    assert "notes.txt" in err and "set data.build_if_missing=false" in err
    assert "choose a new or empty data.dir" in err


def test_a_stale_build_is_rebuilt_but_not_with_a_file_of_the_user_in_it(tmp):
    data = tmp / "built"
    assert kimivl("data", "build", "configs/tiny.yaml", f"data.dir={data}", *TINY).returncode == 0
    rebuilt = kimivl("data", "build", "configs/tiny.yaml", f"data.dir={data}", *TINY, "data.seed=1")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((data / "manifest.json").read_text())["spec"]["seed"] == 1
    (data / "rl" / "mine.jsonl").write_text("{}\n")
    before = snapshot(tmp)
    refused = kimivl("prepare", "configs/tiny.yaml", f"data.dir={data}", f"model.path={tmp}/model",
                     *TINY, "data.seed=2")
    assert refused.returncode == 2 and f"data.dir {data} holds files" in refused.stderr
    assert "rl/mine.jsonl" in refused.stderr
    assert snapshot(tmp) == before


def test_a_changed_built_file_is_the_users(tmp):
    data = build_dataset(TINY_SPEC, tmp / "built", progress=False)
    with open(data / "rl" / "train.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(NotOursError, match="rl/train.jsonl"):
        ensure_dataset(BuildSpec(**{**TINY_SPEC.__dict__, "seed": 1}), data, progress=False)


def test_staging_never_touches_a_neighbour(tmp):
    neighbour = tmp / "built.partial"
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("mine")
    build_dataset(TINY_SPEC, tmp / "built", progress=False)
    assert sorted(p.name for p in tmp.iterdir()) == ["built", "built.partial"]
    assert (neighbour / "keep.txt").read_text() == "mine"


def test_output_dir_is_marked_when_created_and_accepted_again(tmp):
    never = lambda directory: False  # noqa: E731
    out = tmp / "out"
    claim_output_dir(out, "output.dir", "fix", never)
    assert (out / OUTPUT_MARKER).is_file()
    (out / "rl").mkdir()
    claim_output_dir(out, "output.dir", "fix", never)  # ours: accepted with its contents
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "a.txt").write_text("x")
    with pytest.raises(NotOursError, match=f"output.dir {tmp / 'theirs'} is not empty"):
        claim_output_dir(tmp / "theirs", "output.dir", "fix", never)
    assert sorted(p.name for p in (tmp / "theirs").iterdir()) == ["a.txt"]


def test_an_output_dir_of_an_earlier_run_is_accepted(tmp):
    from kimivl_rl.config import load_config
    from kimivl_rl.prepare import claim_targets

    out = tmp / "out"
    (out / "sft_joint").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\n")
    cfg = load_config(None, [f"output.dir={out}", f"data.dir={tmp}/data", "data.build_if_missing=false"])
    claim_targets(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "sft_joint"]  # left as it was
    (out / "config.yaml").unlink()
    (out / "sft_joint").rmdir()
    (out / "config.yaml").write_text("a user's config\n")  # no stage folder: not a run's output
    with pytest.raises(NotOursError, match="output.dir"):
        claim_targets(cfg)


def test_an_output_file_is_replaced_only_while_its_record_matches(tmp):
    out = tmp / "set.jsonl"
    check_replaceable_file(out, "--out", "fix")  # missing: fine
    out.write_text("rows\n")
    with pytest.raises(NotOursError, match="was not written by kimivl-rl"):
        check_replaceable_file(out, "--out", "fix")
    sidecar_path(out).write_text(json.dumps({SHA_KEY: sha256_of(out)}))
    check_replaceable_file(out, "--out", "fix")  # written by kimivl-rl, unchanged
    out.write_text("rows, edited by hand\n")
    with pytest.raises(NotOursError, match="changed since"):
        check_replaceable_file(out, "--out", "fix")
    out.unlink()
    sidecar_path(out).write_text("a user's own stats\n")
    with pytest.raises(NotOursError, match="set.stats.json"):
        check_replaceable_file(out, "--out", "fix")
