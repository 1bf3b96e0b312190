"""A battery of malformed inputs, each answered by a specific message naming the key, file, line or
override and the fix (issue 13, "Bad input"): config values, YAML files, ``--set`` items, dataset
files, reward and environment specs, guard rules, algorithm hyper-parameters, classic-study
arguments; a few go through the command line, which answers with one ``error:`` and exit code 2.

Everything is called directly (load_config, load_rows, resolve_reward_fn, run_study): no model is
built, so the whole file runs in seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.classic.config import make_config
from posttrain.classic.study import run_study
from posttrain.data.datasets import DataError, DataNotFoundError, load_rows
from posttrain.rewards.functions import RewardSpecError, resolve_reward_fn
from posttrain.train.config import ConfigError, load_config

# ----------------------------------------------------------------------------- config values

AGENT = "data.task=key_chain"

CONFIG_VALUES = [
    # algorithm hyper-parameters: checked against the registered function at load, not at step 1
    (
        "negative-clip",
        ["algo.loss_kwargs={clip_low: -0.2}"],
        r"algo\.loss_kwargs\.clip_low: policy loss 'ppo_clip' needs clip_low > 0 .*got -0\.2",
    ),
    (
        "zero-clip",
        ["algo.loss_kwargs={clip_high: 0}"],
        r"algo\.loss_kwargs\.clip_high: policy loss 'ppo_clip' needs clip_high > 0 .*0 stops the update.*got 0",
    ),
    (
        "gspo-negative-clip",
        ["algorithm=gspo", "algo.loss_kwargs={clip_high: -0.0004}"],
        r"algo\.loss_kwargs\.clip_high: policy loss 'gspo' needs clip_high > 0",
    ),
    (
        "yaml-exponent-as-text",
        ["algorithm=gspo", "algo.loss_kwargs={clip_high: 4e-4}"],
        r"needs clip_high to be a float, got '4e-4' \(str\); YAML reads 4e-4 as text: write 4\.0e-4",
    ),
    (
        "dual-clip-below-one",
        ["algo.loss_kwargs={dual_clip: 0.5}"],
        r"algo\.loss_kwargs\.dual_clip: .* needs dual_clip > 1 .*got 0\.5",
    ),
    (
        "clip-as-text",
        ["algo.loss_kwargs={clip_low: big}"],
        r"algo\.loss_kwargs\.clip_low: .* needs clip_low to be a float, got 'big' \(str\)",
    ),
    ("clip-nan", ["algo.loss_kwargs={clip_low: .nan}"], r"needs clip_low to be a finite number, got nan"),
    (
        "misspelt-loss-kwarg",
        ["algo.loss_kwargs={clip_lo: 0.1}"],
        r"algo\.loss_kwargs: policy loss 'ppo_clip' got unknown hyper-parameter\(s\) \['clip_lo'\]; allowed: "
        r"\['clip_high', 'clip_low', 'dual_clip', 'log_ratio_clamp'\] \(did you mean 'clip_low'\?\)",
    ),
    (
        "misspelt-advantage-kwarg",
        ["algorithm=ppo", "algo.advantage_kwargs={gama: 0.9}"],
        r"algo\.advantage_kwargs: advantage estimator 'gae' got unknown hyper-parameter\(s\) \['gama'\];"
        r" allowed: \['gamma', 'lam', 'whiten'\] \(did you mean 'gamma'\?\)",
    ),
    (
        "kwarg-of-another-loss",
        ["algorithm=cispo", "algo.loss_kwargs={dual_clip: 3}"],
        r"policy loss 'cispo' got unknown hyper-parameter\(s\) \['dual_clip'\]; allowed: \['clip_high'",
    ),
    (
        "grpo-scale",
        ["algo.advantage_kwargs={scale: grp}"],
        r"algo\.advantage_kwargs\.scale: advantage estimator 'grpo' needs scale one of "
        r"\['group', 'batch', 'none'\], got 'grp'",
    ),
    (
        "lambda-above-one",
        ["algorithm=ppo", "algo.advantage_kwargs={lam: 1.5}"],
        r"algo\.advantage_kwargs\.lam: advantage estimator 'gae' needs lam in \[0, 1\]",
    ),
    (
        "unknown-advantage",
        ["algo.advantage=gea"],
        r"algo\.advantage: unknown advantage estimator 'gea'; allowed: \[.*'gae'",
    ),
    (
        "unknown-kl-estimator",
        ["algo.kl_estimator=k4"],
        r"algo\.kl_estimator: unknown KL estimator 'k4'; allowed: \['k1'",
    ),
    (
        "kl-without-placement",
        ["algorithm=dr_grpo", "algo.kl_coef=0.1"],
        r"algo\.kl_coef is set, but 'dr_grpo' applies no KL \(kl_placement none\), so it would be ignored; "
        r"also set algo\.kl_placement=loss",
    ),
    (
        "adaptive-kl-without-kl",
        ["algo.kl_coef=0", "optim.adaptive_kl_target=0.1"],
        r"optim\.adaptive_kl_target is set, but the KL coefficient of 'grpo' is 0",
    ),
    # numbers: finite where a finite number is required, in range
    ("inf-lr", ["optim.lr=.inf"], r"optim\.lr: must be a finite number \(not inf or NaN\), got inf"),
    (
        "nan-kl-coef",
        ["algo.kl_coef=.nan"],
        r"algo\.kl_coef: must be a finite number \(not inf or NaN\), got nan",
    ),
    (
        "inf-rollout-temperature",
        ["rollout.temperature=.inf"],
        r"rollout\.temperature: must be a finite number",
    ),
    ("inf-eval-temperature", ["eval.temperature=.inf"], r"eval\.temperature: must be a finite number"),
    ("nan-entropy", ["optim.entropy_coef=.nan"], r"optim\.entropy_coef: must be a finite number"),
    ("eval-zero-prompts", ["eval.num_prompts=0"], r"eval\.num_prompts: .*greater than or equal to 1, got 0"),
    (
        "eval-negative-prompts",
        ["eval.num_prompts=-5"],
        r"eval\.num_prompts: .*greater than or equal to 1, got -5",
    ),
    (
        "negative-entropy",
        ["optim.entropy_coef=-0.1"],
        r"optim\.entropy_coef: .*greater than or equal to 0, got -0\.1",
    ),
    ("top-p-zero", ["rollout.top_p=0"], r"rollout\.top_p: Input should be greater than 0, got 0"),
    (
        "text-for-int",
        ["rollout.group_size=abc"],
        r"rollout\.group_size: Input should be a valid integer.*got 'abc'",
    ),
    (
        "date-for-text",
        ["data.path=x.jsonl", "data.prompt_field=2024-01-01"],
        r"data\.prompt_field: must be text, got datetime\.date\(2024, 1, 1\) \(date\); quote it in YAML",
    ),
    # keys: unknown or misspelt, with a guess
    (
        "misspelt-key",
        ["rollout.group_sise=4"],
        r"rollout\.group_sise: unknown key \(did you mean 'group_size'\? check the spelling",
    ),
    ("misspelt-section", ["optimm.lr=0.1"], r"optimm: unknown key \(did you mean 'optim'\?"),
    ("unknown-algorithm", ["algorithm=grpoo"], r"unknown algorithm 'grpoo'; allowed: \[.*'grpo'"),
    (
        "unknown-task",
        ["data.task=arithmatic"],
        r"data\.task: unknown task 'arithmatic'; available tasks: \['arithmetic'",
    ),
    (
        "unknown-task-option",
        ["data.task_options={bogus: 1}"],
        r"data\.task_options: task 'arithmetic' has no option\(s\) \['bogus'\]; its options are",
    ),
    (
        "task-option-seed",
        ["data.task_options={seed: 3}"],
        r"data\.task_options\.seed is not a task option; set run\.seed",
    ),
    # reward functions, guard rules, environments
    (
        "unknown-builtin-reward",
        ["data.reward_fns=[{fn: exact}]"],
        r"data\.reward_fns\.0\.fn: unknown reward function 'exact': give a built-in name \(arithmetic_exact",
    ),
    (
        "nan-reward-weight",
        ["data.reward_fns=[{fn: arithmetic_exact, weight: .nan}]"],
        r"data\.reward_fns\.0\.weight: must be a finite",
    ),
    (
        "guard-bad-regex",
        [AGENT, "env.guard={rules: [{name: r, pattern: '[a-'}]}"],
        r"env\.guard\.rules\.0\.pattern: '\[a-' is not a regular expression \(unterminated character set",
    ),
    (
        "guard-unknown-action",
        [AGENT, "env.guard={rules: [{name: r, pattern: x, action: block}]}"],
        r"env\.guard\.rules\.0\.action: Input should be 'deny' or 'suspect', got 'block'",
    ),
    (
        "guard-misspelt-key",
        [AGENT, "env.guard={enforse: false}"],
        r"env\.guard\.enforse: unknown key \(did you mean 'enforce'\?",
    ),
    (
        "unknown-env",
        ["env.name=maze"],
        r"env\.name: unknown environment 'maze'; built-in: \['key_chain', 'leaky_chain'\]",
    ),
    (
        "env-unknown-option",
        [AGENT, "env.options={bogus: 1}"],
        r"env\.options: 'key_chain' does not accept \['bogus'\]",
    ),
    (
        "env-missing-module",
        ["env.name=no_such_module_xyz:Env"],
        r"environment 'no_such_module_xyz:Env': cannot import module 'no_such_module_xyz'",
    ),
    (
        "env-key-on-single-turn",
        ["env.max_turns=3"],
        r"env\.max_turns is set, but the task 'arithmetic' is single-turn; set env\.name",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), [c[1:] for c in CONFIG_VALUES], ids=[c[0] for c in CONFIG_VALUES]
)
def test_a_bad_config_value_is_named_with_its_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----------------------------------------------------------------------------- --set items

SET_ITEMS = [
    (
        "no-equals",
        ["rollout.group_size"],
        r"--set expects key=value, got 'rollout\.group_size'; e\.g\. --set",
    ),
    ("empty-key", ["=3"], r"--set '=3': '' is not a key; write section\.key=value"),
    (
        "empty-segment",
        ["rollout..group_size=2"],
        r"--set 'rollout\.\.group_size=2': 'rollout\.\.group_size' is not a key",
    ),
    (
        "unclosed-brace",
        ["algo.loss_kwargs={clip_low: 0.1"],
        r"--set 'algo\.loss_kwargs=\{clip_low: 0\.1', value '\{clip_low: 0\.1': column \d+: .*close the \{ or \[",
    ),
    (
        "unclosed-quote",
        ['run.name="demo'],
        r"--set 'run\.name=\"demo', value .*: column \d+: .*close the quote",
    ),
    (
        "duplicate-key-in-value",
        ["algo.loss_kwargs={clip_low: 0.1, clip_low: 0.2}"],
        r"column \d+: key 'clip_low' is given twice in one mapping",
    ),
    (
        "value-then-section",
        ["rollout=3", "rollout.group_size=2"],
        r"--set 'rollout\.group_size=2': an earlier --set gave rollout the value 3, so it has no keys",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), [c[1:] for c in SET_ITEMS], ids=[c[0] for c in SET_ITEMS])
def test_a_malformed_set_item_is_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ----------------------------------------------------------------------------- YAML files

YAML_FILES = [
    (
        "tab-indent",
        b"rollout:\n\tgroup_size: 2\n",
        r"line 2, column 1: found character '\\t'.*indent with spaces, not tabs",
    ),
    (
        "duplicate-key",
        b"optim:\n  lr: 0.1\noptim:\n  steps: 3\n",
        r"line 3, column 1: key 'optim' is given twice in one mapping \(first on line 1\); keep one of them",
    ),
    (
        "latin-1",
        "run:\n  name: caf\xe9\n".encode("latin-1"),
        r"line 2, column 12: byte 0xe9 is not UTF-8; save the file as UTF-8",
    ),
    (
        "python-tag",
        b"run: !!python/object/apply:os.system ['true']\n",
        r"line 1, column 6: could not determine a constructor .*only plain YAML is read: no !!python",
    ),
    (
        "top-level-list",
        b"- algorithm\n- grpo\n",
        r"expected a mapping at the top level \(`key: value` lines\), got a YAML list",
    ),
    (
        "bad-indent",
        b"rollout:\n  group_size: 2\n temperature: 1\n",
        r"line 3, column 2: expected <block end>.*check the indentation",
    ),
    (
        "nul-character",
        b"algorithm: grpo\x00\n",
        r"line 1, column 16: character U\+0000 is not allowed in YAML; remove it",
    ),
    ("two-documents", b"algorithm: grpo\n---\nalgorithm: ppo\n", r"line 2, column 1: .*drop the extra '---'"),
    (
        "colon-in-value",
        b"run:\n  name: a: b\n",
        r"line 2, column 10: mapping values are not allowed here; quote a value",
    ),
    ("deep-nesting", b"a: " + b"[" * 5000 + b"\n", r"nested too deeply to be a config"),
]


@pytest.mark.parametrize(("content", "message"), [c[1:] for c in YAML_FILES], ids=[c[0] for c in YAML_FILES])
def test_a_malformed_yaml_file_is_named_with_line_and_column(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": " + message):
        load_config(path)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- dataset files

DATA_FILES = [
    ("empty", "rows.jsonl", b"", r"'{path}' has no rows"),
    (
        "bad-json-line-3",
        "rows.jsonl",
        b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",}\n',
        r"'{path}': line 3 is not valid JSON \(Expecting .* at column 16\)",
    ),
    (
        "not-an-object",
        "rows.jsonl",
        b'{"prompt": "a"}\n[1, 2]\n',
        r"'{path}': line 2 is a JSON list, not an object",
    ),
    (
        "no-prompt-column",
        "rows.jsonl",
        b'{"question": "a", "answer": 1}\n',
        r"prompt field 'prompt' not found in '{path}'; available columns: \['question', 'answer'\]\. "
        r"Set `data\.prompt_field`",
    ),
    (
        "row-without-prompt",
        "rows.jsonl",
        b'{"prompt": "a"}\n{"answer": 2}\n',
        r"row 1 \(line 2\) of '{path}' has no prompt field 'prompt' \(its fields: \['answer'\]\)",
    ),
    (
        "empty-prompt",
        "rows.jsonl",
        b'{"prompt": "  "}\n',
        r"row 0 \(line 1\) of '{path}': the prompt .* is empty",
    ),
    (
        "non-utf8-jsonl",
        "rows.jsonl",
        '{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"),
        r"'{path}': line 2 is not valid UTF-8 \(byte 0xe9\); save the file as UTF-8",
    ),
    (
        "non-utf8-csv",
        "rows.csv",
        "prompt,answer\ncaf\xe9,1\n".encode("latin-1"),
        r"'{path}': line 2 is not valid UTF-8 \(byte 0xe9\)",
    ),
    (
        "csv-bad-quote",
        "rows.csv",
        b'prompt,answer\n"open,1\nb,2\n',
        r"could not read '{path}' as csv: ParserError: .*same number of comma-separated fields",
    ),
    ("csv-header-only", "rows.csv", b"prompt,answer\n", r"'{path}' has no rows"),
    (
        "garbage-parquet",
        "rows.parquet",
        b"PAR1 this is not parquet",
        r"could not read '{path}' as parquet: ArrowInvalid: .*write it with pandas\.DataFrame\.to_parquet",
    ),
    ("deep-json", "rows.json", b"[" * 100_000, r"'{path}': nested too deeply to hold rows"),
    (
        "wrong-extension",
        "rows.txt",
        b'{"prompt": "a"}\n',
        r"unsupported dataset file '{path}': supported extensions are \['\.csv', '\.json', '\.jsonl', '\.parquet'\]",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), [c[1:] for c in DATA_FILES], ids=[c[0] for c in DATA_FILES]
)
def test_a_bad_dataset_file_is_named_with_its_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message.format(path=re.escape(str(path)))):
        load_rows(path)


def test_a_missing_dataset_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"dataset not found: data\.path '.*nope\.jsonl'"):
        load_rows(tmp_path / "nope.jsonl", config_key="data.path")


def test_a_missing_required_field_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(
        DataError, match=r"required field 'answer' not found in .*; available columns: \['prompt'\]"
    ):
        load_rows(path, required_fields=["answer"])


# ----------------------------------------------------------------------------- reward specs

REWARD_SPECS = [
    (
        "unknown-builtin",
        "exactt",
        r"unknown reward function 'exactt': give a built-in name \(arithmetic_exact",
    ),
    ("missing-module", "no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz' .*install it"),
    (
        "missing-attribute",
        "json:nosuch",
        r"'json' has no attribute 'nosuch'; callables defined there: \[.*'loads'",
    ),
    ("not-callable", "{tmp}/rewards.py:x", r"'x' is a int, not callable; point the spec at a function"),
    ("missing-file", "{tmp}/missing.py:f", r"file '.*missing\.py' does not exist"),
    ("malformed", ":f", r"reward function ':f' is malformed: give a built-in name"),
]


@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in REWARD_SPECS], ids=[c[0] for c in REWARD_SPECS])
def test_a_bad_reward_spec_is_named(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "rewards.py").write_text("x = 3\n")
    with pytest.raises(RewardSpecError, match=message):
        resolve_reward_fn(spec.format(tmp=tmp_path))


# ----------------------------------------------------------------------------- classic study arguments

STUDIES = [
    ("zero-seeds", {"seeds": 0}, r"seeds \(--seeds\) must be a whole number >= 1 \(runs per arm\), got 0"),
    ("zero-steps", {"steps": 0}, r"steps \(--steps\) must be a whole number >= 1 .*got 0"),
    ("negative-steps", {"steps": -100}, r"steps \(--steps\) must be a whole number >= 1 .*got -100"),
    ("no-arm", {"algos": []}, r"no arm to run: give --algos"),
    ("unknown-arm", {"algos": ["a2c"]}, r"unknown algo 'a2c' in arm 'a2c'; choose one of"),
    ("bad-discount", {"algos": ["grpo@x"]}, r"arm 'grpo@x': '@' must be followed by a discount in \[0, 1\]"),
    (
        "discount-above-one",
        {"algos": ["grpo@1.5"]},
        r"arm 'grpo@1\.5': classic setting gamma must be in \[0, 1\]",
    ),
    (
        "group-of-one",
        {"group_size": 1},
        r"group_size must be >= 2 for 'grpo' \(a group of one episode has no baseline",
    ),
    (
        "unknown-env",
        {"env_id": "Foo-v1"},
        r"unknown environment 'Foo-v1' \(--env\): .*Known here: CartPole-v1",
    ),
]


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in STUDIES], ids=[c[0] for c in STUDIES])
def test_a_bad_classic_study_fails_before_writing_anything(
    tmp_path: Path, change: dict, message: str
) -> None:
    args = {"env_id": "CartPole-v1", "algos": ["grpo"], "seeds": 1, "steps": 100, **change}
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.csv").write_text("earlier results\n")
    extra = {"group_size": args.pop("group_size")} if "group_size" in args else {}
    with pytest.raises(ValueError, match=message):
        run_study(args["env_id"], args["algos"], args["seeds"], args["steps"], out, progress=False, **extra)
    assert (out / "runs.csv").read_text() == "earlier results\n"  # nothing overwritten


def test_a_nonsense_classic_setting_fails_when_configured() -> None:
    with pytest.raises(ValueError, match=r"classic setting lr must be a finite number > 0, got nan"):
        make_config("CartPole-v1", "ppo", lr=float("nan"))
    with pytest.raises(
        ValueError, match=r"classic setting clip must be a finite number > 0 \(the PPO clip range\)"
    ):
        make_config("CartPole-v1", "ppo", clip=-0.2)


# ----------------------------------------------------------------------------- through the command line


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return " ".join(line.strip() for line in err.splitlines())


CLI_CASES = [
    (
        "train-misspelt-kwarg",
        ["train", "--set", "algo.loss_kwargs={clip_lo: 0.1}"],
        r"error: invalid config: algo\.loss_kwargs: policy loss 'ppo_clip' got unknown hyper-parameter",
    ),
    ("train-bad-set", ["train", "--set", "rollout.group_size={"], r"error: --set 'rollout\.group_size=\{'"),
    (
        "train-bad-yaml",
        ["train", "--config", "{tmp}/bad.yaml"],
        r"error: .*bad\.yaml: line 2, column 1: found character",
    ),
    (
        "classic-zero-seeds",
        ["classic", "--seeds", "0", "--out", "{tmp}"],
        r"error: seeds \(--seeds\) must be a whole",
    ),
    (
        "classic-zero-steps",
        ["classic", "--steps", "0", "--out", "{tmp}"],
        r"error: steps \(--steps\) must be a whole",
    ),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_cli_answers_bad_input_with_one_error_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from posttrain.cli import main

    (tmp_path / "bad.yaml").write_text("rollout:\n\tgroup_size: 2\n")
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    assert re.search(message, _one_error_line(capsys))
    assert not list(tmp_path.glob("**/runs.csv"))


def test_a_bad_discount_list_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from posttrain.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["classic", "--gammas", "abc"])
    assert stop.value.code == 2
    assert "argument --gammas: expected comma-separated discounts such as 0.9,0.99,1.0; got 'abc'" in (
        capsys.readouterr().err
    )
