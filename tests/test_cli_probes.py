"""The CLI checks before it computes (issue #15): one package without cycles, inputs and outputs checked before a
model loads, corrupt weights reported in one line, flags that do not apply refused, progress and a cost warning for
long prompts, one process filling a cold cache while others wait, one analysis registry."""

import ast
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

import tiny
from locedit.cli import common
from locedit.cli.main import build_parser, main
from locedit.errors import FactError, ModelLoadError

PROMPT = "The Eiffel Tower is located in the city of"
ONE_FACT = ["--subject", "Eiffel Tower", "--prompt", PROMPT]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save(tmp_path_factory.mktemp("tiny-llama"), "llama", "metaspace")


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command loads a model."""
    def refuse(args, **kwargs):
        raise AssertionError("the command loaded a model before checking its inputs and outputs")
    monkeypatch.setattr(common, "load_model", refuse)


def one_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("locedit: error")]
    assert len(lines) == 1, err
    assert pattern in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# --- 1. layout -------------------------------------------------------------------------------------------------
def test_cli_package_has_shared_helpers_and_no_cycles():
    cli = Path(common.__file__).parent
    imports = {}
    for path in cli.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("locedit.cli"):
                names |= {f"{node.module}.{a.name}" for a in node.names}
                assert not any(a.name.startswith("_") for a in node.names), f"{path.name} imports a private name"
        imports[path.stem] = names
    assert imports["common"] == set(), "common.py imports nothing else of the CLI"
    for verb, names in imports.items():
        if verb not in ("main", "common", "__init__"):
            assert names <= {"locedit.cli.common"}, f"{verb}.py imports {names}"
    classes = [n.name for p in cli.glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.ClassDef) and "Error" in n.name]
    assert classes == []  # the one user-error type is locedit.errors.UsageError
    from locedit.errors import UsageError
    assert common.UsageError is UsageError


# --- 2. inputs and outputs checked before the model loads ------------------------------------------------------
def test_edit_out_existing_file_refused_before_model(tmp_path, model_dir, no_model, capsys):
    existing = tmp_path / "edit.json"
    existing.write_text("{}")
    code = main(["edit", "--model", str(model_dir), *ONE_FACT, "--new-target", " guitar", "--out", str(existing)])
    assert code == 2
    assert "--out" in one_error(capsys, "is not a directory")
    assert existing.read_text() == "{}"


def test_out_in_read_only_directory_refused_before_model(tmp_path, model_dir, no_model, monkeypatch, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode: False if Path(p) == read_only
                        else real_access(p, mode))  # root ignores permission bits, so simulate them
    code = main(["edit", "--model", str(model_dir), *ONE_FACT, "--new-target", " guitar",
                 "--out", str(read_only / "edit")])
    assert code == 2
    one_error(capsys, "not writable")
    assert main(["locate", "--model", str(model_dir), *ONE_FACT, "--out", str(read_only)]) == 2
    one_error(capsys, "not writable")
    assert not (read_only / "edit").exists()


@pytest.mark.parametrize("verb", [["locate"], ["analyze", "knockout"], ["edit"], ["evaluate", "--out", "o"]])
def test_missing_facts_file_reported_without_loading_the_model(verb, tmp_path, model_dir, no_model, capsys):
    code = main([*verb, "--model", str(model_dir), "--facts", str(tmp_path / "missing.jsonl")])
    assert code == 2
    one_error(capsys, "missing.jsonl")


def test_facts_verb_names_its_file_flag(tmp_path, no_model, capsys):
    assert main(["facts", "--file", str(tmp_path / "nope.json")]) == 2
    assert "--file" in one_error(capsys, "nope.json")


def test_bad_hparams_and_paragraphs_files_checked_before_model(tmp_path, model_dir, no_model, capsys):
    bad = tmp_path / "hp.json"
    bad.write_text("{not json")
    assert main(["edit", "--model", str(model_dir), *ONE_FACT, "--new-target", " guitar", "--hparams", str(bad)]) == 2
    one_error(capsys, "hp.json")
    assert main(["analyze", "sublayer", "--model", str(model_dir), *ONE_FACT,
                 "--paragraphs", str(tmp_path / "none.jsonl")]) == 2
    one_error(capsys, "none.jsonl")


def test_failed_analysis_leaves_no_empty_output_directory(tmp_path, model_dir, monkeypatch, capsys):
    import locedit.localization.knockout as knockout

    def failing(lm, fact, **options):
        raise FactError("the analysis failed")
    monkeypatch.setattr(knockout, "attention_knockout", failing)
    out = tmp_path / "new" / "deeper"
    assert main(["analyze", "knockout", "--model", str(model_dir), *ONE_FACT, "--out", str(out)]) == 2
    one_error(capsys, "the analysis failed")
    assert not (tmp_path / "new").exists()


def test_removed_on_failure_removes_only_what_it_created_and_is_empty(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError):
        with common.removed_on_failure([tmp_path / "a" / "b", kept, tmp_path / "c"]):
            (tmp_path / "a" / "b").mkdir(parents=True)
            (tmp_path / "c").mkdir()
            (tmp_path / "c" / "line.jsonl").write_text("{}\n")  # a resumable run's lines stay
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists() and kept.is_dir() and (tmp_path / "c" / "line.jsonl").exists()


# --- 3. corrupt weights ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_corrupt_safetensors_is_a_model_load_error_naming_the_file(damage, tmp_path, capsys):
    import locedit

    directory = tiny.save(tmp_path / "m", "gpt2")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        locedit.load(str(directory))
    assert main(["locate", "--model", str(directory), *ONE_FACT, "--out", str(tmp_path / "o")]) == 2
    one_error(capsys, "model.safetensors")
    assert not (tmp_path / "o").exists()


# --- 4. flags that do not apply, numeric flags named -----------------------------------------------------------
def test_heads_with_rome_refused(model_dir, no_model, capsys):
    code = main(["edit", "--model", str(model_dir), *ONE_FACT, "--new-target", " guitar", "--method", "rome",
                 "--heads", "99.0"])
    assert code == 2
    one_error(capsys, "--heads does not apply to --method rome")


@pytest.mark.parametrize("argv,flag", [
    (["edit", *ONE_FACT, "--new-target", " x", "--method", "ft", "--stats-tokens", "100"], "--stats-tokens"),
    (["edit", *ONE_FACT, "--new-target", " x", "--method", "rome", "--nullspace"], "--nullspace"),
    (["analyze", "knockout", *ONE_FACT, "--projection", "paper"], "--projection"),
    (["analyze", "heads", *ONE_FACT, "--window", "3"], "--window"),
    (["analyze", "trace", *ONE_FACT, "--batch-facts", "4"], "--batch-facts"),
    (["locate", *ONE_FACT, "--only-known"], "--only-known"),
    (["evaluate", "--facts", "curated", "--out", "o", "--every", "5"], "--every"),
    (["facts", "--model", "other-model"], "--model"),
])
def test_flags_that_do_not_apply_are_refused(argv, flag, model_dir, no_model, capsys):
    assert main([*argv, "--model", str(model_dir)]) == 2
    assert flag in one_error(capsys, "appl")


@pytest.mark.parametrize("argv,flag", [
    (["edit", *ONE_FACT, "--new-target", " x", "--stats-tokens", "0"], "--stats-tokens"),
    (["locate", *ONE_FACT, "--samples", "-1"], "--samples"),
    (["analyze", "knockout", "--facts", "curated", "--limit", "many"], "--limit"),
    (["evaluate", "--facts", "curated", "--out", "o", "--jobs", "0"], "--jobs"),
    (["edit", *ONE_FACT, "--new-target", " x", "--method", "head", "--heads", "fourteen"], "--heads"),
    (["locate", *ONE_FACT, "--device", "gpu0"], "--device"),
])
def test_numeric_flags_name_the_flag(argv, flag, no_model, capsys):
    assert main(argv) == 2
    assert flag in one_error(capsys, "argument")


def test_help_lists_every_option():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"{name} --help misses {flag}"


# --- 5. progress and the cost warning for long prompts ---------------------------------------------------------
def test_analyze_warns_about_long_prompts(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(common, "LONG_PROMPT_TOKENS", 5)
    assert main(["analyze", "knockout", "--model", str(model_dir), *ONE_FACT, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "locedit: warning: a prompt is" in err and "tokens long" in err


def test_locate_shows_progress_and_warns_about_long_prompts(tmp_path, model_dir, monkeypatch, capsys):
    import locedit.localization.sites as sites

    monkeypatch.setattr(sites, "LONG_PROMPT", 5)  # locate's own cost warning, printed by the CLI as one line
    assert main(["locate", "--model", str(model_dir), *ONE_FACT, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("locedit: warning: long prompt") == 1 and "intervention rows" in err
    counts = [int(n) for n in re.findall(r"locate: (\d+)pass", err)]  # the forward-pass counter's states
    assert counts and max(counts) >= 2, err


def test_library_warnings_print_as_one_line(tmp_path, model_dir, monkeypatch, capsys):
    import warnings

    import locedit.localization.knockout as knockout

    def warns(lm, fact, **options):
        warnings.warn("this prompt is costly", UserWarning)
        raise FactError("stop")
    monkeypatch.setattr(knockout, "attention_knockout", warns)
    assert main(["analyze", "knockout", "--model", str(model_dir), *ONE_FACT, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "locedit: warning: this prompt is costly" in err and "warnings.warn" not in err and "UserWarning" not in err


# --- 6. one process fills a cold cache, the others wait and read it --------------------------------------------
def run_together(fn, n=2):
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_gguf_conversion_runs_once_for_two_concurrent_loads(tmp_path, monkeypatch):
    from locedit.core import loading

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake content")
    calls = []

    def slow_convert(path, dtype):
        calls.append(path)
        time.sleep(1.0)
        return tiny.model("gpt2"), tiny.tokenizer("bytelevel")
    monkeypatch.setattr(loading, "_load_gguf", slow_convert)
    paths = run_together(lambda: loading.gguf_converted(gguf))
    assert len(calls) == 1
    assert paths[0] == paths[1] and (paths[0] / "model.safetensors").is_file()


def test_statistics_corpus_sampled_once_for_two_concurrent_runs(tmp_path, monkeypatch):
    from locedit.editing import corpus, stats

    monkeypatch.setenv("LOCEDIT_CACHE", str(tmp_path / "cache"))
    lm = tiny.lm("gpt2")
    samples, passes = [], []
    real_sample, real_accumulate = corpus.sample_ids, stats._accumulate

    def slow_sample(*args, **kwargs):
        samples.append(1)
        time.sleep(1.0)
        return real_sample(*args, **kwargs)

    def counted_accumulate(*args, **kwargs):
        passes.append(1)
        time.sleep(0.5)
        return real_accumulate(*args, **kwargs)
    monkeypatch.setattr(corpus, "sample_ids", slow_sample)
    monkeypatch.setattr(stats, "_accumulate", counted_accumulate)
    results = run_together(lambda: stats.key_statistics(lm, layers=[1], tokens=64, progress=False))
    assert len(samples) == 1 and len(passes) == 1
    assert torch.equal(results[0].get("mlp", 1), results[1].get("mlp", 1))
    assert {results[0].loaded, results[1].loaded} == {frozenset(), frozenset({("mlp", 1)})}


# --- 7. one analysis registry ----------------------------------------------------------------------------------
def test_one_registry_feeds_the_cli_and_run_dataset(monkeypatch):
    from locedit.localization import registry, runner

    parser = build_parser()
    analyze = next(a for a in parser._actions if a.dest == "command").choices["analyze"]
    choices = next(a for a in analyze._actions if a.dest == "analysis").choices
    assert sorted(choices) == sorted(r.cli_name for r in registry.cli_records())
    assert runner.ANALYSES is registry.ANALYSES
    record = registry.AnalysisRecord("toy", "locedit.localization.knockout:attention_knockout", "toy_result",
                                     figure="builtins:len", cli_options=("window",))
    monkeypatch.setitem(registry.ANALYSES, "toy", record)
    assert runner.dataset_figure([{"analysis": "toy_result"}] * 3, {}) == 3
    assert runner.resolve_analysis("toy")[1] is runner.resolve_analysis("knockout")[1]
    assert "toy" in [r.name for r in registry.cli_records()]
    from locedit.localization.knockout import attention_knockout
    assert runner.batched_form(attention_knockout) is registry.record("knockout").load_batched()


# --- 8. a given --target is the one tracked; use_fact_target is not passed -------------------------------------
def test_cli_passes_the_given_target_and_no_use_fact_target(tmp_path, model_dir, monkeypatch, capsys):
    import locedit.localization.knockout as knockout

    seen = {}

    def capture(lm, fact, **options):
        seen.update(fact=fact, options=options)
        raise FactError("captured")
    monkeypatch.setattr(knockout, "attention_knockout", capture)
    argv = ["analyze", "knockout", "--model", str(model_dir), *ONE_FACT, "--out", str(tmp_path / "o")]
    assert main([*argv, "--target", " Paris", "--window", "3"]) == 2
    assert seen["fact"].target == " Paris" and seen["options"] == {"window": 3}
    assert main(argv) == 2
    assert seen["fact"].target is None and "use_fact_target" not in seen["options"]
    capsys.readouterr()
