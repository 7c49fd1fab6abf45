"""The ``kimivl-rl`` command line.

Each subcommand is a thin wrapper over a library function; configs are loaded with
``load_config(FILE, overrides)``, so ``key.sub=value`` arguments work everywhere a config does.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from kimivl_rl.config import ConfigError, dump_config, load_config
from kimivl_rl.data.formats import FORMATS
from kimivl_rl.data.rows import DataError
from kimivl_rl.infra.layout import OutputLayout
from kimivl_rl.infra.ownership import NotOursError
from kimivl_rl.infra.ray_runtime import shutdown_ray
from kimivl_rl.infra.remote import RunStopped
from kimivl_rl.models.families import DEFAULT_FAMILY, FAMILIES

DEFAULT_CONFIG = "configs/tiny.yaml"


def _add_config_args(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                            help=f"YAML config (default: {DEFAULT_CONFIG})")
    else:
        parser.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    parser.set_defaults(config_optional=optional)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. rl.samples_per_prompt=8")
    parser.add_argument("--verbose", action="store_true",
                        help="per-step detail on the console too (output.verbose=true)")


def _add_row_args(parser: argparse.ArgumentParser) -> None:
    """A data file and how to read it: the options of the config's data section."""
    from kimivl_rl.config.schema import DataConfig

    defaults = DataConfig()
    parser.add_argument("file")
    parser.add_argument("--require-answer", action="store_true",
                        help="rows must have an answer (RL and evaluation files)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--oversize-images", choices=["resize", "reject"],
                        default=defaults.oversize_images)
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="count bad rows instead of stopping at the first")
    parser.add_argument("--format", choices=["auto", *FORMATS], default=defaults.format,
                        help="the rows' shape (data.format; default: detected from the keys)")
    parser.add_argument("--prompt-key", default=defaults.prompt_key, help="data.prompt_key")
    parser.add_argument("--answer-key", default=defaults.answer_key, help="data.answer_key")
    parser.add_argument("--image-key", default=defaults.image_key, help="data.image_key")
    parser.add_argument("--prompt-template", default=defaults.prompt_template,
                        help="data.prompt_template, e.g. '{problem} Answer in \\boxed{}.'")


def _config(args):
    return load_config(args.config, _overrides(args))


def _overrides(args) -> list[str]:
    """The command line's ``KEY=VALUE`` overrides, ``--verbose`` among them."""
    return [*args.overrides, *(["output.verbose=true"] if args.verbose else [])]


# ----------------------------------------------------------------------------- commands

def cmd_config_show(args) -> None:
    print(dump_config(_config(args)), end="")


def cmd_config_check(args) -> None:
    from kimivl_rl.prepare import checked_config
    from kimivl_rl.rollout.limits import max_model_len

    cfg = checked_config(_config(args), missing_ok=True)  # the data files that exist here
    max_model_len(cfg, cfg.model.path)
    print(f"OK: {args.config} is a valid config (model {cfg.model.path}, data {cfg.data.dir}, "
          f"{cfg.rollout.max_images_per_prompt} image(s) per prompt)")


def cmd_model_init(args) -> None:
    from kimivl_rl.models.tiny import TinyVLMSpec, build_tiny_vlm
    from kimivl_rl.prepare import tiny_corpus

    spec = TinyVLMSpec(seed=args.seed, family=args.family, think_open=args.think_open,
                       think_close=args.think_close)
    out = build_tiny_vlm(args.out, spec, tiny_corpus(), setting="--out")
    print(f"tiny {args.family} VLM written to {out} (seed {args.seed})")


def cmd_data_build(args) -> None:
    from kimivl_rl.data.build import BuildSpec, build_dataset

    cfg = _config(args)
    out = build_dataset(BuildSpec.from_config(cfg.data), args.out or cfg.data.dir,
                        setting="--out" if args.out else "data.dir")
    print(f"built-in data written to {out} (seed {cfg.data.seed})")


def _row_loader(args):
    """The loader ``data check`` and ``data convert`` read ``args.file`` with."""
    from kimivl_rl.config.schema import TEMPLATE_SLOT
    from kimivl_rl.data.formats import RowFormat
    from kimivl_rl.data.rows import RowLoader

    if args.prompt_template and TEMPLATE_SLOT not in args.prompt_template:
        raise ConfigError(f"--prompt-template must hold {TEMPLATE_SLOT} where the row's prompt goes")
    row_format = RowFormat(args.format, args.prompt_key, args.answer_key, args.image_key,
                           args.prompt_template)
    return RowLoader(args.file, require_answer=args.require_answer, max_pixels=args.max_pixels,
                     oversize_images=args.oversize_images,
                     bad_rows="skip" if args.skip_bad_rows else "error", row_format=row_format)


def cmd_data_check(args) -> None:
    loader = _row_loader(args)
    count = sum(1 for _ in loader)
    print(f"OK: {args.file}: format {loader.format or 'unknown (no readable row)'}, {count} row(s) "
          f"valid, {loader.skipped} skipped, {loader.resized} image(s) resized")


def cmd_data_convert(args) -> None:
    from kimivl_rl.data.convert import convert_file

    loader = _row_loader(args)
    done = convert_file(loader, args.out)
    print(f"{args.file} (format {done['format']}): {done['rows']} row(s) written to {done['file']}"
          f" with their images, {done['skipped']} skipped, {done['resized']} image(s) resized")


def cmd_label_difficulty(args) -> None:
    from pathlib import Path

    from kimivl_rl.prepare import with_absolute_paths
    from kimivl_rl.system.difficulty import check_label_paths, label_difficulty

    cfg = with_absolute_paths(_config(args))
    in_file = Path(args.input or Path(cfg.data.dir) / cfg.rl.train_file)
    out_file = Path(args.out or in_file.with_name(f"{in_file.stem}.labelled{in_file.suffix}"))
    check_label_paths(in_file, out_file)  # before the model or the data are built
    model = checked_model_argument(args.model)
    cfg, base_model, _ = _prepared_config(args, writes_output=False)
    print(json.dumps(label_difficulty(cfg, model or base_model, in_file, out_file), indent=1))


def cmd_build_long_cot(args) -> None:
    from pathlib import Path

    from kimivl_rl.system.long_cot_builder import build_long_cot, format_summary
    from kimivl_rl.prepare import with_absolute_paths

    # The flags are config overrides, so they are checked (and reported) like any other.
    flags = {"samples": "long_cot_builder.samples_per_prompt", "temperature": "rollout.temperature",
             "max_new_tokens": "rollout.max_new_tokens",
             "min_tokens": "long_cot_builder.min_response_tokens",
             "max_tokens": "long_cot_builder.max_response_tokens",
             "min_behaviours": "long_cot_builder.min_behaviours"}
    overrides = [*_overrides(args), *(f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                                      if getattr(args, flag) is not None)]
    cfg = with_absolute_paths(load_config(args.config, overrides))
    teacher = str(Path(args.teacher).resolve()) if Path(args.teacher).exists() else args.teacher
    print(format_summary(build_long_cot(cfg, teacher, Path(args.prompts), Path(args.out))))


def cmd_prepare(args) -> None:
    from kimivl_rl.prepare import check_data, claim_targets, ensure_data, ensure_model

    cfg = _config(args)
    claim_targets(cfg, output=False)
    model = ensure_model(cfg)
    data = ensure_data(cfg)
    check_data(cfg)
    print(f"model: {model}\ndata:  {data}")


def _prepared_config(args, writes_output: bool = True):
    """The config with absolute paths, its model and data built if needed; first of all, a
    data.dir or output.dir that kimivl-rl did not write is refused (``claim_targets``)."""
    from kimivl_rl.prepare import claim_targets, ensure_data, ensure_model, with_absolute_paths

    cfg = with_absolute_paths(_config(args))
    claim_targets(cfg, output=writes_output)
    return cfg, ensure_model(cfg), ensure_data(cfg)


def cmd_sft(args) -> None:
    model = checked_model_argument(args.model)
    cfg, base_model, _ = _prepared_config(args)
    from kimivl_rl.sft.trainer import run_stage  # after the checks: it imports torch and Ray

    summary = run_stage(cfg, args.stage, base_model, input_model=model)
    print(json.dumps({"stage": args.stage, "output_model": summary["output_model"],
                      "eval": summary["eval"]}, indent=1))


def checked_model_argument(model: str | None) -> str | None:
    """``--model`` as an absolute path when it exists (Ray workers run in other directories), as
    given when it can be a hub id (``name`` or ``namespace/name``); a missing local path stops
    the command here, before any output is claimed, instead of reaching the hub client as a
    malformed repo id."""
    from pathlib import Path

    if model is None:
        return model
    if Path(model).exists():
        return str(Path(model).resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"--model {model}: no such file or directory (a hub model is named "
                          f"namespace/name)")
    return model


def cmd_rl(args) -> None:
    model = checked_model_argument(args.model)
    cfg, base_model, _ = _prepared_config(args)
    # after the checks: it imports torch and Ray
    from kimivl_rl.system.controller import rl_input_model, run_rl

    print(json.dumps(run_rl(cfg, rl_input_model(cfg, base_model, model)), indent=1))


EVAL_REPORT = "kimivl-rl eval"  # the "report" key of every evaluation report this writes


def _eval_report_files(cfg, models: list[str], outs: list[str] | None) -> list:
    """Where the reports go: one ``--out`` per ``--model`` (missing, or an earlier report of
    ours), else ``output.dir/eval/<model>.json`` in an output directory kimivl-rl owns."""
    from pathlib import Path

    from kimivl_rl.infra.ownership import refusal
    from kimivl_rl.prepare import claim_targets

    if not outs:
        reports = [OutputLayout.of(cfg).eval_report(model) for model in models]
        if len(set(reports)) < len(reports):
            raise ConfigError(f"--model: two models would write the same report "
                              f"({', '.join(map(str, reports))}); name one --out per model")
        claim_targets(cfg)
        return reports
    if len(outs) != len(models):
        raise ConfigError(f"--out: {len(outs)} given for {len(models)} --model; name one report "
                          f"file per model, or none (output.dir/eval/)")
    for out in map(Path, outs):
        try:
            ours = not out.exists() or json.loads(out.read_text()).get("report") == EVAL_REPORT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise refusal("--out", out, "exists and is not an evaluation report of kimivl-rl",
                          "Name a new file.")
    return [Path(out) for out in outs]


def cmd_eval(args) -> None:
    from pathlib import Path

    from kimivl_rl.evaluation import (evaluate_model, evaluation_rows, format_report,
                                      on_rollout_resources)
    from kimivl_rl.infra.ray_runtime import init_ray
    from kimivl_rl.prepare import ensure_data, with_absolute_paths
    from kimivl_rl.rollout.limits import fit_images

    cfg = with_absolute_paths(_config(args))
    outs = _eval_report_files(cfg, args.model, args.out)
    models = [checked_model_argument(model) for model in args.model]
    data_file = Path(args.file).resolve() if args.file else ensure_data(cfg) / cfg.rl.eval_file
    if not data_file.is_file():
        raise DataError(f"{data_file}: evaluation file not found")
    limit = args.limit or cfg.rl.eval_prompts
    cfg = fit_images(cfg, evaluation_rows(cfg, str(data_file), limit))  # before Ray and vLLM
    samples = cfg.eval.samples if args.samples is None else args.samples
    init_ray(cfg)
    reports = []
    for model, out in zip(models, outs):
        report = on_rollout_resources(cfg, evaluate_model, model, str(data_file), limit, samples,
                                      None, True,  # the config's max_new_tokens; keep the responses
                                      step=f"evaluate {model}")
        report = {"report": EVAL_REPORT, "model": model, "file": str(data_file), **report}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"{model} on {data_file} ({report['examples']} prompts)\n{format_report(report)}\n"
              f"report: {out}\n")
        reports.append(report)
    if len(reports) > 1:
        print(_comparison(models, reports))


def _comparison(models: list[str], reports: list[dict]) -> str:
    """The models side by side (numbered in the order given) and each one's change over the one
    before, on the tier the last step's starting model settles (as RL's summary does)."""
    from kimivl_rl.summary import format_stages, format_steps, stage_row, stage_steps

    names = [f"model {n}" for n in range(1, len(models) + 1)]
    tier = reports[-2]["tier"]
    legend = [f"{name}: {model}" for name, model in zip(names, models)]
    return "\n".join([*legend, format_stages([stage_row(n, r) for n, r in zip(names, reports)]),
                      format_steps(stage_steps(list(zip(names, reports)), tier), tier)])


def cmd_run(args) -> None:
    from kimivl_rl.pipeline import parse_stages, run_pipeline
    from kimivl_rl.prepare import claim_targets, with_absolute_paths
    from kimivl_rl.summary import format_summary

    try:
        stages = parse_stages(args.stages)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = with_absolute_paths(_config(args))
    claim_targets(cfg)
    summary = run_pipeline(cfg, stages)
    print("\n" + format_summary(summary))
    for plot in summary["plots"]:
        print(f"plot: {plot}")


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimivl-rl",
        description="Kimi-VL-Thinking style training on Ray: joint SFT, long-CoT SFT, online RL.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = commands.add_parser("config", help="show or check a config").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    show = config.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    check = config.add_parser("check", help="validate a config, its engine limits and the rows of "
                                          "its data files that exist here, without loading any model")
    _add_config_args(check)
    check.set_defaults(func=cmd_config_check)

    model = commands.add_parser("model", help="build models").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    init = model.add_parser("init", help="build the tiny VLM offline from a seed")
    init.add_argument("--out", required=True,
                      help="output directory (new, empty, or a tiny model it built before)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--family", choices=sorted(FAMILIES), default=DEFAULT_FAMILY,
                      help="the architecture (default %(default)s)")
    init.add_argument("--think-open", default="<think>")
    init.add_argument("--think-close", default="</think>")
    init.set_defaults(func=cmd_model_init)

    data = commands.add_parser("data", help="build, check or convert data").add_subparsers(
        dest="action", metavar="ACTION", required=True)
    build = data.add_parser("build", help="write the built-in data set (config's data section)")
    _add_config_args(build, optional=True)
    build.add_argument("--out", help="output directory, new, empty or built by it before "
                                     "(default: the config's data.dir)")
    build.set_defaults(func=cmd_data_build)
    check_data = data.add_parser("check", help="validate a data file (JSONL, JSON or Parquet, any "
                                               "format of data.format) and name its format")
    _add_row_args(check_data)
    check_data.set_defaults(func=cmd_data_check)
    convert = data.add_parser("convert", help="write a data file in the project's own format "
                                              "(JSONL and PNG images) to see or edit it")
    _add_row_args(convert)
    convert.add_argument("--out", required=True, metavar="DIR",
                         help="output directory, new, empty or written by it before")
    convert.set_defaults(func=cmd_data_convert)

    sft = commands.add_parser("sft", help="run one SFT stage as a Ray Train job")
    _add_config_args(sft)
    sft.add_argument("--stage", choices=["joint", "long_cot"], required=True)
    sft.add_argument("--model", help="checkpoint to start from (default: model.path for joint, "
                                     "the joint SFT output for long_cot)")
    sft.set_defaults(func=cmd_sft)

    run = commands.add_parser("run", help="the whole recipe: joint SFT -> long-CoT SFT -> RL "
                                          "(a rerun resumes)")
    _add_config_args(run, optional=True)
    run.add_argument("--stages", default="joint,long_cot,rl",
                     help="comma-separated subset of joint,long_cot,rl (default: all three)")
    run.set_defaults(func=cmd_run)

    evaluate = commands.add_parser(
        "eval", help="held-out greedy accuracy, mean@K and pass@K (by difficulty, task and tier), "
                     "response length, trace format and reward reasons of a checkpoint")
    _add_config_args(evaluate)
    evaluate.add_argument("--model", required=True, action="append", metavar="DIR",
                          help="checkpoint to evaluate; several (--model A --model B ...) are "
                               "compared, each over the one before, on the same prompts")
    evaluate.add_argument("--samples", type=int, metavar="K",
                          help="samples per prompt at rollout.temperature (default: eval.samples; "
                               "0: greedy only)")
    evaluate.add_argument("--file", metavar="FILE",
                          help="rows with a reference 'answer' (default: data.dir/rl.eval_file)")
    evaluate.add_argument("--limit", type=int, metavar="N",
                          help="first N rows only (default: rl.eval_prompts)")
    evaluate.add_argument("--out", metavar="JSON", action="append",
                          help="report file, with every prompt's greedy response, extracted "
                               "answer and score under 'responses'; one per --model (default: "
                               "output.dir/eval/<model dir name>.json)")
    evaluate.set_defaults(func=cmd_eval)

    rl = commands.add_parser("rl", help="run the RL stage on Ray (vLLM rollouts, reward service, "
                                        "DeepSpeed learners)")
    _add_config_args(rl)
    rl.add_argument("--model", help="checkpoint to start from (default: the long-CoT SFT output "
                                    "if present, else the joint SFT output, else model.path)")
    rl.set_defaults(func=cmd_rl)

    label = data.add_parser("label-difficulty", help="pass rate of each RL prompt over "
                                                     "sampler.label_samples samples (vLLM + reward service)")
    _add_config_args(label, optional=True)
    label.add_argument("--model", help="checkpoint to sample from (default: model.path)")
    label.add_argument("--input", help="RL prompts, in any format data.format reads (default: the "
                                       "config's rl.train_file)")
    label.add_argument("--out", help="output next to the input, in its format with a pass_rate per "
                                     "row (default: <input stem>.labelled<input suffix>)")
    label.set_defaults(func=cmd_label_difficulty)

    long_cot = data.add_parser(
        "build-long-cot", help="long-CoT SFT set by rejection sampling from a teacher (vLLM + "
                               "reward service): verified answers, length and behaviour filters, dedup")
    _add_config_args(long_cot, optional=True)
    long_cot.add_argument("--teacher", required=True, metavar="MODEL_DIR",
                          help="checkpoint to sample traces from")
    long_cot.add_argument("--prompts", required=True, metavar="FILE",
                          help="prompts with a reference answer, in any format data.format reads")
    long_cot.add_argument("--out", required=True, metavar="FILE",
                          help="output JSONL; statistics go to <out stem>.stats.json beside it")
    long_cot.add_argument("--samples", type=int, metavar="N", help="samples per prompt "
                          "(default: long_cot_builder.samples_per_prompt)")
    long_cot.add_argument("--temperature", type=float, metavar="T", help="default: rollout.temperature")
    long_cot.add_argument("--max-new-tokens", type=int, metavar="N", help="default: rollout.max_new_tokens")
    long_cot.add_argument("--min-tokens", type=int, metavar="N",
                          help="min response tokens (default: long_cot_builder.min_response_tokens)")
    long_cot.add_argument("--max-tokens", type=int, metavar="N",
                          help="max response tokens (default: long_cot_builder.max_response_tokens)")
    long_cot.add_argument("--min-behaviours", type=int, metavar="N",
                          help="behaviours the thinking must show (default: long_cot_builder.min_behaviours)")
    long_cot.set_defaults(func=cmd_build_long_cot)

    prepare = commands.add_parser("prepare", help="build the config's tiny model and data if absent")
    _add_config_args(prepare, optional=True)
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`sft CONFIG --stage joint rl.x=1`): collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "config", None) and "=" in args.config and args.config_optional:
        # `kimivl-rl run rl.lr=1e-5`: an override where the optional config would go
        args.overrides, args.config = [args.config, *args.overrides], DEFAULT_CONFIG
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"this command takes no KEY=VALUE overrides: {' '.join(extra)}")
        args.overrides = args.overrides + extra
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ConfigError, DataError, NotOursError) as exc:
        print(f"kimivl-rl: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        shutdown_ray()
        command = shlex.join(["kimivl-rl", *(sys.argv[1:] if argv is None else argv)])
        print(f"kimivl-rl: error: {exc} To resume: {command}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
