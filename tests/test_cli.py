"""The command line rejects bad input before it loads a model (issue 13, item 9): one
``prog: error: ...`` line after the usage on stderr, exit code 2, no traceback. Checks that need
the tokenizer (a prompt's length in tokens) run right after loading, before any forward pass:
they are tested with a tiny random model saved to a folder. ``--prompt-tokens`` is honoured
within the tolerance ``passkey_prompt`` states."""

import itertools

import pytest
import torch

from triton_chunkkv import demo, models
from triton_chunkkv.__main__ import main
from triton_chunkkv.eval import cli as eval_cli
from triton_chunkkv.eval import loading, runner, tasks

# A chat template for the byte-level test tokenizer (SmolLM2's has its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_POSITIONS = 600


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_default_model", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.fixture
def no_forward_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(demo, "greedy_answer", refuse)
    monkeypatch.setattr(runner, "evaluate", refuse)


def usage_error(capsys, argv, prog=None, entry=main) -> str:
    """Runs the command line, expects an argparse error; returns its error line."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # loading a model prints progress bars first
    assert any(line.startswith("usage:") for line in lines)
    prog = prog or f"triton-chunkkv {argv[0]}"
    assert lines[-1].startswith(f"{prog}: error: "), lines[-1]
    return lines[-1]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


# (command line, a fragment of the error line); "{tmp}" is the test's folder.
DEMO_ERRORS = [
    ("--ratio 2", "argument --ratio: must be a number in (0, 1], got 2"),
    ("--ratio 0", "argument --ratio: must be a number in (0, 1]"),
    ("--ratio nan", "argument --ratio: must be a number in (0, 1]"),
    ("--ratio half", "argument --ratio: expected a number, got 'half'"),
    ("--chunk-size 0", "argument --chunk-size: must be >= 1, got 0"),
    ("--chunk-size 2.5", "argument --chunk-size: expected an integer, got '2.5'"),
    ("--window 0", "argument --window: must be >= 1, got 0"),
    ("--mode drop", "argument --mode: invalid choice: 'drop'"),
    ("--prompt-file /nonexistent", "argument --prompt-file: no such file: /nonexistent"),
    ("--prompt-file {tmp}/folder", "argument --prompt-file: no such file"),
    ("--prompt-file {tmp}/binary.txt", "binary.txt: 'utf-8' codec can't decode"),
    ("--prompt-tokens 0", "argument --prompt-tokens: must be >= 1, got 0"),
    ("--depth 1.5", "argument --depth: must be a number in [0, 1], got 1.5"),
    ("--depth -0.1", "argument --depth: must be a number in [0, 1]"),
    ("--max-new-tokens 0", "argument --max-new-tokens: must be >= 1, got 0"),
    ("--device cuda", "argument --device: cuda: CUDA is not available on this machine"),
    ("--device cuda:1", "argument --device: cuda:1: CUDA is not available on this machine"),
    ("--device tpu", "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("--model /nonexistent", "argument --model: no such folder: /nonexistent"),
    ("--model {tmp}/folder", "folder has no config.json (not a Hugging Face model)"),
    (
        "--prompt-tokens 9539",
        "--prompt-tokens: a prompt of 9539 tokens plus 16 new tokens exceeds the model's 8192 "
        "positions (max_position_embeddings)",
    ),
    ("--prompt-tokens 8180", "a prompt of 8180 tokens plus 16 new tokens exceeds the model's"),
    ("--prompt-tokens 20 --window 32", "--window 32 is longer than the prompt"),
]


@pytest.mark.parametrize("command, message", DEMO_ERRORS, ids=[c for c, _ in DEMO_ERRORS])
def test_demo_rejects_bad_options_before_loading(
    capsys, monkeypatch, files, no_model_loads, command, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["demo", *command.format(tmp=files).split()]
    assert message in usage_error(capsys, argv)


EVAL_ERRORS = [
    ("--methods nosuch", "argument --methods: method 'nosuch': policy must be one of"),
    ("--methods chunkkv:window=0", "--methods chunkkv:window=0: window must be >= 1, got 0"),
    ("--methods chunkkv:foo=1", "--methods chunkkv:foo=1: ChunkKV.__init__() got an unexpected"),
    ("--methods chunkkv:window", "options are key=value"),
    ("--methods chunkkv:mode=dense", "--methods chunkkv:mode=dense: mode must be one of"),
    ("--methods h2o:mode=question", "--methods h2o:mode=question: mode='question' selects"),
    ("--ratios 1.5", "argument --ratios: must be a number in (0, 1), got 1.5"),
    ("--ratios 0.2 1", "argument --ratios: must be a number in (0, 1), got 1"),
    ("--lengths 0", "argument --lengths: must be >= 1, got 0"),
    ("--lengths 512 9000", "--lengths: a prompt of 9000 tokens exceeds the model's 8192 positions"),
    ("--depths 2", "argument --depths: must be a number in [0, 1], got 2"),
    ("--per-cell 0", "argument --per-cell: must be >= 1, got 0"),
    ("--max-batch 0", "argument --max-batch: must be >= 1, got 0"),
    ("--threads 0", "argument --threads: must be >= 1, got 0"),
    ("--device cuda", "argument --device: cuda: CUDA is not available on this machine"),
    ("--dtype float64", "argument --dtype: invalid choice: 'float64'"),
    ("--model nosuch", "argument --model: expected 'smollm2', 'tiny-random', a local"),
    ("--model {tmp}/folder", "argument --model: expected 'smollm2'"),
    ("--tasks nosuch", "argument --tasks: invalid choice: 'nosuch'"),
    ("--out {tmp}/empty --report-only", "--report-only needs {tmp}/empty/results.jsonl"),
    ("--out {tmp}/a_file", "--out {tmp}/a_file is a file, not a folder"),
]


@pytest.mark.parametrize("command, message", EVAL_ERRORS, ids=[c for c, _ in EVAL_ERRORS])
def test_eval_rejects_bad_options_before_loading(
    capsys, monkeypatch, files, no_model_loads, command, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = command.format(tmp=files).split()
    out = [] if "--out" in options else ["--out", str(files / "out")]
    assert message.format(tmp=files) in usage_error(capsys, ["eval", *out, *options])


def test_python_m_eval_reports_the_same_way(capsys, files, no_model_loads):
    line = usage_error(
        capsys,
        ["--out", str(files / "out"), "--methods", "chunkkv:window=0"],
        prog="python -m triton_chunkkv.eval",
        entry=eval_cli.main,
    )
    assert "window must be >= 1" in line


# ---------------------------------------------------------------------------------------------
# Checks that need the tokenizer: a tiny random model in a folder
# ---------------------------------------------------------------------------------------------


def byte_tokenizer():
    """Bytes as tokens, with a chat template: a prompt's length is its length in bytes."""
    tokenizer = loading.byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    model, _ = loading.tiny_random_model(seed=0, num_layers=2)
    model.config.max_position_embeddings = TINY_POSITIONS
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_demo_rejects_too_few_prompt_tokens_after_loading(
    capsys, tiny_model_folder, no_forward_pass
):
    minimum = models.passkey_prompt_min_tokens(byte_tokenizer())
    argv = ["demo", "--model", str(tiny_model_folder), "--prompt-tokens", "10", "--window", "4"]
    line = usage_error(capsys, argv)
    assert f"--prompt-tokens must be >= {minimum} (the pass-key prompt without filler" in line


def test_demo_rejects_a_prompt_file_longer_than_the_model(
    capsys, tmp_path, tiny_model_folder, no_forward_pass
):
    prompt = tmp_path / "long.txt"
    prompt.write_text("x" * TINY_POSITIONS)
    line = usage_error(
        capsys, ["demo", "--model", str(tiny_model_folder), "--prompt-file", str(prompt)]
    )
    assert f"--prompt-file {prompt}: a prompt of" in line
    assert f"plus 16 new tokens exceeds the model's {TINY_POSITIONS} positions" in line


def test_demo_reads_the_positions_from_the_model_folder(capsys, tiny_model_folder, no_model_loads):
    argv = ["demo", "--model", str(tiny_model_folder), "--prompt-tokens", str(TINY_POSITIONS)]
    assert f"exceeds the model's {TINY_POSITIONS} positions" in usage_error(capsys, argv)


def test_demo_runs_with_valid_options(capsys, monkeypatch, tiny_model_folder, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels have their own tests
    argv = ["demo", "--model", str(tiny_model_folder), "--prompt-tokens", "400", "--window", "8"]
    assert main([*argv, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "prompt   " in out and "pass key" in out


def test_eval_rejects_prompts_longer_than_the_model_before_any_forward_pass(
    capsys, tmp_path, no_forward_pass
):
    """tiny-random's 4096 positions are known once it is built."""
    argv = ["eval", "--out", str(tmp_path / "out"), "--model", "tiny-random", "--tasks"]
    argv += ["passkey", "--lengths", "4500", "--depths", "0.5", "--per-cell", "1"]
    line = usage_error(capsys, [*argv, "--methods", "fullkv", "--no-progress"])
    assert "--lengths (prompt passkey-4500-d0.5-0): a prompt of" in line
    assert "new tokens exceeds the model's 4096 positions" in line


# ---------------------------------------------------------------------------------------------
# --prompt-tokens: passkey_prompt's length
# ---------------------------------------------------------------------------------------------


def longest_sentence_tokens(tokenizer) -> int:
    """What one filler sentence (the evaluation's, ``tasks.filler_sentence``) adds to the prompt
    at most."""
    words = (tasks.SUBJECTS, tasks.PREDICATES, tasks.CLAUSES)
    return max(
        len(tokenizer(f" {subject} {predicate}{clause}.", add_special_tokens=False).input_ids)
        for subject, predicate, clause in itertools.product(*words)
    )


def assert_within_tolerance(tokenizer, lengths, tolerance):
    for num_tokens in lengths:
        prompt = models.passkey_prompt(tokenizer, num_tokens=num_tokens, depth=0.3, seed=1)
        assert num_tokens - tolerance < prompt.num_tokens <= num_tokens, num_tokens
        assert prompt.passkey in prompt.text


def test_passkey_prompt_is_within_one_sentence_of_the_length():
    tokenizer = byte_tokenizer()
    minimum = models.passkey_prompt_min_tokens(tokenizer, seed=1)
    lengths = [minimum, minimum + 1, minimum + 50, 700, 1500]
    assert_within_tolerance(tokenizer, lengths, longest_sentence_tokens(tokenizer))
    with pytest.raises(ValueError, match=f"num_tokens must be >= {minimum}"):
        models.passkey_prompt(tokenizer, num_tokens=minimum - 1, seed=1)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    if (models.default_model_dir() / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(models.default_model_dir())
    try:
        return AutoTokenizer.from_pretrained(models.gguf_dir(), gguf_file=models.GGUF_FILE)
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.mark.slow
def test_passkey_prompt_tolerance_with_the_default_tokenizer(smollm_tokenizer):
    """The numbers the demo's help states: a minimum of 94 tokens, at most 19 short."""
    assert models.passkey_prompt_min_tokens(smollm_tokenizer) == 94
    assert longest_sentence_tokens(smollm_tokenizer) == 19
    assert_within_tolerance(smollm_tokenizer, [94, 95, 110, 333, 1000, 2048], 20)
