"""textgen-eval: metric functions against hand-computed values, perplexity protocols against direct computation,
sampling metrics and sweeps, and the CLI's error handling."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import char_tokenizer
from onnx import TensorProto, helper

from repl.evaluate import main, parse_sweeps
from runtime import evaluation, scoring
from runtime.evaluation import (
    EvalError,
    GenerationPlan,
    draw_samples,
    evaluate_documents,
    evaluate_perplexity,
    sweep_grid,
)
from runtime.modelfile import ModelInfo, SpecialTokens, StateSpec, encode_metadata
from runtime.scoring import ScoringError, default_protocol, sliding_windows, token_nll
from runtime.session import OnnxModel
from runtime.settings import build_settings
from runtime.textmetrics import chunk_evenly, distinct_n, entropy, text_stats, unique_word_rate, words

REPO = Path(__file__).resolve().parents[1]
TEXT = "abc def, ghij.\nab cd ef gh ij.\n"


def open_model(path: Path) -> OnnxModel:
    return OnnxModel.open(path, device="cpu", threads=1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Reference log-softmax in float64, independent of runtime.scoring. The callers cut the logits to the
    tokenizer's ids first: the scorer's padded-vocabulary rule."""
    values = logits.astype(np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ============================================================================================== metric functions


def test_words_are_case_folded_and_skip_punctuation() -> None:
    assert words("Hello, hello WORLD! Don't\nstop.") == ["hello", "hello", "world", "don't", "stop"]
    assert words(" ,.;\n") == []


def test_distinct_n_and_unique_word_rate_by_hand() -> None:
    samples = ["a b a b", "A, c"]  # words: [a b a b] [a c]
    assert distinct_n(samples, 1) == pytest.approx(3 / 6)  # pooled: a, b, c of 6 words
    # bigrams ab ba ab | ac: the pair (b, a) across the sample boundary does not count
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)
    assert distinct_n(samples, 3) == pytest.approx(2 / 2)  # aba bab | (none)
    assert math.isnan(distinct_n(["one two"], 3))  # no trigram at all: undefined, not 0


def test_unique_word_rate_is_a_mean_within_samples() -> None:
    assert unique_word_rate(["a b a b", "A, c"]) == pytest.approx((2 / 4 + 2 / 2) / 2)
    # within "a a a a": 1/4; within "b c": 2/2; a text with no words is left out
    assert unique_word_rate(["a a a a", "b c", "!!"]) == pytest.approx((0.25 + 1.0) / 2)
    assert math.isnan(unique_word_rate(["...", ""]))
    assert text_stats(["a a a a", "b c"]).unique_word_rate == pytest.approx(0.625)


def test_entropy_of_known_distributions() -> None:
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    rows = entropy(np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.25, 0.0]]))
    expected = [0.0, math.log(4), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))]
    assert rows == pytest.approx(expected)


def test_token_nll_by_hand() -> None:
    logits = np.array([[0.0, math.log(3.0)], [5.0, 5.0]], dtype=np.float32)  # p = [1/4, 3/4] and [1/2, 1/2]
    nll = token_nll(logits, np.array([1, 0]))
    assert nll == pytest.approx([-math.log(0.75), math.log(2)], rel=1e-6)
    huge = token_nll(np.array([[1e4, 0.0]], dtype=np.float32), np.array([0]))  # no overflow
    assert huge == pytest.approx([0.0], abs=1e-6)


def test_chunk_evenly_spreads_non_overlapping_chunks() -> None:
    assert chunk_evenly(list(range(10)), 3, 2) == [[0, 1], [4, 5], [8, 9]]
    assert chunk_evenly(list(range(10)), 5, 3) == [[0, 1, 2], [3, 4, 5], [7, 8, 9]]  # only 3 fit
    assert chunk_evenly([1, 2], 4, 5) == [[1, 2]]
    assert chunk_evenly([], 3, 2) == []


# ============================================================================================== perplexity


def test_sliding_windows_score_every_token_once_with_enough_context() -> None:
    for n_ids in (2, 3, 10, 24, 25, 61):
        for window, stride in ((4, 1), (4, 2), (4, 3), (4, 4), (7, 3), (24, 12)):
            scored: list[int] = []
            for w in sliding_windows(n_ids, window, stride):
                assert w.end - w.start <= window
                for target in range(w.first_scored, w.end + 1):
                    scored.append(target)
                    context = target - w.start
                    assert context >= min(target, window - stride + 1)
            assert scored == list(range(1, n_ids)), (n_ids, window, stride)


def write_uniform_gpt(path: Path, vocab_extra: int = 2, context: int = 8) -> Path:
    """A hand-built graph with the GPT-2 contract whose logits are all 0: every next token has p = 1/V."""
    tokenizer = char_tokenizer("abcdefghij .,\n")
    vocab = tokenizer.get_vocab_size() + vocab_extra
    heads, head_dim = 1, 2
    const = helper.make_tensor
    zero = const("zero", TensorProto.FLOAT, [1], [0])
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Constant", [], ["vocab"], value=const("v", TensorProto.INT64, [1], [vocab])),
        helper.make_node("Concat", ["ids_shape", "vocab"], ["logits_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["logits_shape"], ["logits"], value=zero),
        helper.make_node("Constant", [], ["i0"], value=const("i0", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["i1"], value=const("i1", TensorProto.INT64, [1], [1])),
        helper.make_node("Gather", ["ids_shape", "i0"], ["batch"], axis=0),
        helper.make_node("Gather", ["ids_shape", "i1"], ["seq"], axis=0),
        helper.make_node("Constant", [], ["heads"], value=const("h", TensorProto.INT64, [1], [heads])),
        helper.make_node("Constant", [], ["hdim"], value=const("d", TensorProto.INT64, [1], [head_dim])),
        helper.make_node("Concat", ["batch", "heads", "seq", "hdim"], ["kv_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["kv_shape"], ["new_kv"], value=zero),
        helper.make_node("Concat", ["past_key_values.0.key", "new_kv"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new_kv"], ["present.0.value"], axis=2),
    ]
    kv = ["batch", heads, "past", head_dim]
    graph = helper.make_graph(
        nodes, "uniform-gpt",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv),
            helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", heads, "total", head_dim]),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", heads, "total", head_dim]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # make_model's default IR version is newer than onnxruntime 1.31 accepts
    specs = tuple(
        StateSpec(input=f"past_key_values.0.{part}", output=f"present.0.{part}",
                  shape=("batch", heads, "past", head_dim), batch_axis=0, seq_axis=2)
        for part in ("key", "value")
    )
    info = ModelInfo(arch="gpt2", tokenizer_json=tokenizer.to_str(), special=SpecialTokens(eos=0, unk=1),
                     vocab_size=vocab, context_length=context, state=specs, inputs=("attention_mask", "position_ids"))
    for key, value in encode_metadata(info).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_uniform_logits_give_perplexity_equal_to_vocab_size(model_factory, tmp_path: Path) -> None:
    rnn = open_model(model_factory("rnn", weight_scale=0.0, pad_vocab=3))  # every weight 0: logits all 0
    gpt = open_model(write_uniform_gpt(tmp_path / "uniform.onnx"))
    for model in (rnn, gpt):
        result = evaluate_perplexity(model, TEXT * 3)
        # the softmax runs over the tokenizer's ids only: the vocabulary padding is not a possible next token
        assert model.tokenizer_size < model.info.vocab_size
        assert result.perplexity == pytest.approx(model.tokenizer_size, rel=1e-9)
        assert result.bits_per_token == pytest.approx(math.log2(model.tokenizer_size), rel=1e-9)
        assert result.n_tokens == len(TEXT * 3)  # every character is one token and is scored once
        assert result.bits_per_char == pytest.approx(result.bits_per_token, rel=1e-9)


def test_stateful_rnn_perplexity_is_exact_across_chunks(model_files, monkeypatch) -> None:
    """Carrying the state between chunks gives the same loss as one pass over the whole stream."""
    model = open_model(model_files.lstm)
    ids = np.array([model.info.special.eos, *model.encode(TEXT * 4)], dtype=np.int64)
    logits, _ = model.run_all(ids[None, :-1], model.initial_state(1), 0)
    direct = -log_softmax(logits[0, :, : model.tokenizer_size])[np.arange(len(ids) - 1), ids[1:]].sum()
    monkeypatch.setattr(scoring, "MAX_CHUNK", 7)  # force many chunk boundaries
    result = evaluate_perplexity(model, TEXT * 4)
    assert result.n_tokens == len(ids) - 1
    assert result.nats_per_token * result.n_tokens == pytest.approx(direct, rel=1e-5)


def test_documents_are_joined_with_eos_and_separators_count_as_characters(model_files) -> None:
    model = open_model(model_files.gru)
    docs = ["abc de", "fgh", "ij."]
    result = evaluate_documents(model, docs, single_stream=False)
    eos = model.info.special.eos
    ids = [eos]
    for doc in docs:
        ids += [*model.encode(doc), eos]
    logits, _ = model.run_all(np.array([ids[:-1]]), model.initial_state(1), 0)
    direct = -log_softmax(logits[0, :, : model.tokenizer_size])[np.arange(len(ids) - 1), ids[1:]].sum()
    assert result.n_tokens == len(ids) - 1
    assert result.n_chars == sum(map(len, docs)) + len(docs)
    assert result.nats_per_token * result.n_tokens == pytest.approx(direct, rel=1e-5)
    assert result.bits_per_char == pytest.approx(direct / math.log(2) / result.n_chars, rel=1e-5)


def test_gpt2_stride_equal_to_window_matches_direct_computation_on_short_text(model_files) -> None:
    model = open_model(model_files.gpt)
    window = model.info.context_length
    text = TEXT[: window - 4]  # eos + text fits in one window
    ids = np.array([model.info.special.eos, *model.encode(text)], dtype=np.int64)
    logits, _ = model.run_all(ids[None, :-1], model.initial_state(1), 0)
    direct = -log_softmax(logits[0, :, : model.tokenizer_size])[np.arange(len(ids) - 1), ids[1:]].mean()
    result = evaluate_perplexity(model, text, protocol=default_protocol(model, stride=window))
    assert result.n_tokens == len(ids) - 1
    assert result.nats_per_token == pytest.approx(direct, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(direct), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 5, 24])
def test_gpt2_sliding_window_matches_brute_force_contexts(model_files, stride: int) -> None:
    """Each token t is predicted from ids[k*stride : t], k the first window that reaches t: recompute every
    prediction from exactly that context and compare the sum."""
    model = open_model(model_files.gpt)
    window = model.info.context_length
    text = (TEXT * 3)[:70]
    ids = np.array([model.info.special.eos, *model.encode(text)], dtype=np.int64)
    expected = 0.0
    for target in range(1, len(ids)):
        start = max(0, math.ceil((target - window) / stride)) * stride
        logits, _ = model.run_all(ids[None, start:target], model.initial_state(1), 0)
        expected -= log_softmax(logits[0, -1, : model.tokenizer_size])[ids[target]]
    result = evaluate_perplexity(model, text, protocol=default_protocol(model, stride=stride))
    assert result.n_tokens == len(ids) - 1
    assert result.nats_per_token * result.n_tokens == pytest.approx(expected, rel=1e-5)


def test_bad_stride_and_empty_text_are_eval_errors(model_files) -> None:
    model = open_model(model_files.gpt)
    with pytest.raises(ScoringError, match="stride"):
        evaluate_perplexity(model, TEXT, protocol=default_protocol(model, stride=model.info.context_length + 1))
    with pytest.raises(ScoringError, match="stride"):
        evaluate_perplexity(model, TEXT, protocol=default_protocol(model, stride=0))
    with pytest.raises(EvalError, match="empty"):
        evaluate_perplexity(model, "")


def train_char_lstm(tmp_path: Path, text: str) -> Path:
    """A tiny char LSTM trained for 80 steps, saved as a checkpoint and exported for real."""
    import torch

    from export.onnx_export import export_checkpoint
    from models.checkpoint import save_checkpoint
    from models.rnn import RNNConfig, RNNLanguageModel
    from train.tokenizer import build_tokenizer, special_token_ids

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared 2-core machine
    tokenizer = build_tokenizer("char", [text])
    ids = torch.tensor(tokenizer.encode(text).ids)
    config = RNNConfig(vocab_size=tokenizer.get_vocab_size(), embedding_size=16, hidden_size=32, num_layers=1)
    model = RNNLanguageModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq, batch = 32, 16
    try:
        for _ in range(80):
            starts = torch.randint(0, len(ids) - seq - 1, (batch,))
            inputs = torch.stack([ids[s : s + seq] for s in starts])
            targets = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
            logits, _ = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    checkpoint = tmp_path / "trained.bin"
    save_checkpoint({
        "arch": "lstm", "model_config": config.to_dict(), "tokenizer": tokenizer.to_str(),
        "special_tokens": special_token_ids(tokenizer), "model": model.state_dict(),
        "generation": {"temperature": 0.8, "top_k": 0, "max_new_tokens": 40},
    }, checkpoint)
    return export_checkpoint(checkpoint, tmp_path / "trained.onnx").path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    text = "the cat sat on the mat. the dog sat on the log. " * 40
    return train_char_lstm(tmp_path_factory.mktemp("trained"), text), text


def test_perplexity_on_training_text_is_below_random_text(trained_model) -> None:
    path, text = trained_model
    model = open_model(path)
    rng = np.random.default_rng(0)
    alphabet = sorted(set(text))
    random_text = "".join(rng.choice(alphabet, size=len(text)))
    own = evaluate_perplexity(model, text)
    noise = evaluate_perplexity(model, random_text)
    assert own.perplexity < 2.0 < noise.perplexity
    assert own.n_unknown == 0


def test_cli_perplexity_json_and_csv_corpus(trained_model, tmp_path: Path, capsys) -> None:
    path, text = trained_model
    rows = tmp_path / "held.csv"
    rows.write_text("id,body\n1,the cat sat on the mat.\n2,the dog sat on the log.\n", encoding="utf-8")
    assert main(["--model", str(path), "--data", str(rows), "--column", "body", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    perplexity = report["perplexity"]
    assert perplexity["n_chars"] == len("the cat sat on the mat.") * 2 + 2  # two separators
    model = open_model(path)
    direct = evaluate_documents(model, ["the cat sat on the mat.", "the dog sat on the log."], single_stream=False)
    assert perplexity["perplexity"] == pytest.approx(direct.perplexity)
    assert perplexity["perplexity"] < 3.0
    # Issue 16: per word too (6 + 6 whitespace words + 2 separators), consistent with the per-token total.
    total = perplexity["nats_per_token"] * perplexity["n_tokens"]
    assert perplexity["n_words"] == 14
    assert perplexity["nats_per_word"] == pytest.approx(total / 14)
    assert perplexity["perplexity_per_word"] == pytest.approx(math.exp(total / 14))
    assert perplexity["bits_per_char"] == pytest.approx(total / math.log(2) / perplexity["n_chars"])


# ============================================================================================== sampling


def test_greedy_samples_match_the_repl_session(model_files) -> None:
    """The evaluation samples are the greedy tokens of a runtime.generate.Session turn, sliding included, with the
    same context (eos + prompt) for an empty and a non-empty prompt."""
    from runtime.generate import Session

    for path in (model_files.lstm, model_files.gpt):
        model = open_model(path)
        settings = build_settings(model.info.generation, [("max_new_tokens", "40")], {"sampler": "greedy"})
        for prompt in ("", "ab c"):
            result = draw_samples(model, settings, GenerationPlan(n_samples=3, prompt=prompt, max_new_tokens=None,
                                                                  seed=1, batch_size=2))
            reference = Session(model, settings).generate(prompt)
            assert result.texts == [reference.text] * 3
            assert result.token_counts == [len(reference.tokens) - (reference.stop_reason == "eos")] * 3
            assert result.entropy_sum == 0.0 and result.entropy_steps == 3 * len(reference.tokens)
        assert settings.get("seed") is None and settings.get("max_new_tokens") == 40  # the caller's settings intact


def test_sampling_entropy_is_that_of_the_processed_distribution(model_files) -> None:
    model = open_model(model_files.tiny)  # vocab: eos, unk, a, b
    one = build_settings({}, [("top_k", "1"), ("temperature", "1")], {})
    result = draw_samples(model, one, GenerationPlan(4, "", 12, seed=0))
    assert result.entropy_sum == 0.0 and result.entropy_steps > 0  # top_k 1 leaves one candidate
    flat = build_settings({}, [("top_k", "0"), ("temperature", "1e6"), ("min_new_tokens", "12")], {})
    result = draw_samples(model, flat, GenerationPlan(4, "", 12, seed=0))
    # temperature -> infinity: uniform over the ids the chain allows (a, b, unk; eos is banned by min_new_tokens)
    assert result.entropy_sum / result.entropy_steps == pytest.approx(math.log(3), rel=1e-4)
    assert result.token_counts == [12] * 4 and not any(result.ended_on_eos)


def test_eos_share_and_seeded_reproducibility(model_files) -> None:
    eager = open_model(model_files.eager_eos)
    settings = build_settings(eager.info.generation, [], {})
    result = draw_samples(eager, settings, GenerationPlan(5, "", 20, seed=3, batch_size=2))
    metrics = evaluation.sample_metrics(result)
    assert metrics["eos_share"] == 1.0 and metrics["mean_tokens"] == 0.0
    model = open_model(model_files.lstm)
    settings = build_settings(model.info.generation, [], {})
    first = draw_samples(model, settings, GenerationPlan(6, "ab", 15, seed=7, batch_size=4))
    again = draw_samples(model, settings, GenerationPlan(6, "ab", 15, seed=7, batch_size=4))
    other = draw_samples(model, settings, GenerationPlan(6, "ab", 15, seed=8, batch_size=4))
    assert first.texts == again.texts and first.texts != other.texts
    assert len(first.texts) == 6
    assert first.texts[4:] != first.texts[:2]  # the second batch continues the random stream, not a replay


def test_ctrl_c_stops_the_sampling_evaluation(model_files, monkeypatch, capsys) -> None:
    """The batch decode loop returns partial results on Ctrl-C; an evaluation must stop, not report them."""
    model = open_model(model_files.lstm)
    calls = [0]
    original_run = OnnxModel.run

    def interrupted_run(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(OnnxModel, "run", interrupted_run)
    settings = build_settings(model.info.generation, [], {})
    with pytest.raises(KeyboardInterrupt):
        draw_samples(model, settings, GenerationPlan(4, "ab", 12, seed=0, batch_size=2))
    calls[0] = 0
    assert main(["--model", str(model_files.lstm), "--samples", "4", "--max-tokens", "12", "--device", "cpu"]) == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted" and "tokens" not in captured.out


def test_cli_model_run_error_is_one_line(model_files, tmp_path: Path, monkeypatch, capsys) -> None:
    from runtime.session import ModelRunError

    def failing_run(self, *args, **kwargs):
        raise ModelRunError("running lstm.onnx failed: Failed to allocate memory")

    monkeypatch.setattr(OnnxModel, "run_all", failing_run)
    text_file = tmp_path / "held.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    for extra in (["--data", str(text_file)], ["--samples", "2", "--max-tokens", "3"]):
        assert main(["--model", str(model_files.lstm), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err
        assert err == "error: running lstm.onnx failed: Failed to allocate memory\n", extra


def test_sweep_grid_table_csv_and_json(model_files, tmp_path: Path, capsys) -> None:
    reference = tmp_path / "held.txt"
    reference.write_text(TEXT * 20, encoding="utf-8")
    out = tmp_path / "sweep.csv"
    args = ["--model", str(model_files.lstm), "--samples", "3", "--max-tokens", "12", "--device", "cpu",
            "--sweep", "temp=0.7,1.0,1.5", "--sweep", "sampler=greedy,sample", "--reference", str(reference),
            "--judge", str(model_files.gru), "--csv", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "temp" in printed and "reference" in printed and "dist-2" in printed
    with out.open(newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    header, body = table[0], table[1:]
    assert header == ["temp", "sampler", "unique_word_rate", "distinct_1", "distinct_2", "distinct_3", "entropy",
                      "mean_tokens", "mean_words", "eos_share", "judge_nats"]
    assert len(body) == 3 * 2 + 1  # the grid, then the reference row
    assert [row[:2] for row in body[:-1]] == [[t, s] for t in ("0.7", "1.0", "1.5") for s in ("greedy", "sample")]
    assert body[-1][:2] == ["reference", ""]
    greedy_rows = [row for row in body if row[1] == "greedy"]
    assert all(float(row[header.index("entropy")]) == 0.0 for row in greedy_rows)
    sampled = [row for row in body if row[1] == "sample"]
    assert all(float(row[header.index("entropy")]) > 0.0 for row in sampled)
    assert body[-1][header.index("entropy")] == ""  # undefined for the reference
    assert all(float(row[header.index("judge_nats")]) > 0 for row in body[:-1])

    assert main([*args[:-2], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["sampling"]["rows"]
    assert len(rows) == 6 and rows[0]["settings"] == {"temp": "0.7", "sampler": "greedy"}
    assert report["sampling"]["reference"]["entropy"] is None
    assert set(evaluation.METRIC_COLUMNS) <= set(rows[0])


def test_a_sweep_prints_the_settings_every_row_shares(model_factory, capsys) -> None:
    """Issue 16: a temperature sweep keeps the model file's top_k/top_p; the output says so above the table and
    in --json, and --base plain starts from the bare distribution instead."""
    path = model_factory("rnn", generation={"temperature": 0.8, "top_k": 40, "top_p": 0.95, "max_new_tokens": 30})
    args = ["--model", str(path), "--samples", "2", "--max-tokens", "5", "--device", "cpu", "--sweep", "temp=0.7,1.0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "base settings of every row: top_k 40 (model), top_p 0.95 (model)" in printed
    assert "temperature" not in printed.split("base settings of every row:")[1].splitlines()[0]  # swept: varies
    assert main([*args, "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["sampling"]["base"]
    assert base["from"] == "model" and base["settings"]["top_k"] == {"value": 40, "source": "model"}
    assert base["settings"]["max_new_tokens"] == {"value": 5, "source": "cli"} and "temperature" not in base["settings"]
    assert main([*args, "--base", "plain", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)["sampling"]["base"]
    assert base["from"] == "plain"
    assert base["settings"]["top_k"] == {"value": 0, "source": "plain"}
    assert base["settings"]["top_p"] == {"value": 1.0, "source": "plain"}
    settings = build_settings(evaluation.base_defaults({"top_k": 40, "top_p": 0.9}, "plain"), [], {"temp": "0.5"})
    assert (settings.get("top_k"), settings.get("top_p"), settings.get("temperature")) == (0, 1.0, 0.5)


def test_sweep_parsing() -> None:
    sweeps = parse_sweeps(["temp=0.7,1.0", "top_p=0.5,0.9,1"])
    grid = sweep_grid(sweeps)
    assert len(grid) == 6 and grid[0] == {"temp": "0.7", "top_p": "0.5"} and grid[-1] == {"temp": "1.0", "top_p": "1"}
    assert sweep_grid([]) == [{}]
    for bad in (["temp"], ["temp="], ["temp=0.7,,1"], ["temp=1", "temp=2"]):
        with pytest.raises(EvalError):
            parse_sweeps(bad)


def test_reference_chunks_match_the_sample_length(model_files) -> None:
    model = open_model(model_files.lstm)
    metrics, count = evaluation.reference_metrics(model, [TEXT * 10], True, n_chunks=4, mean_tokens=9.6)
    assert count == 4 and metrics["mean_tokens"] == 10.0
    assert 0 < metrics["distinct_1"] <= 1 and math.isnan(metrics["eos_share"])


# ============================================================================================== CLI errors


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repl.evaluate", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_bad_inputs_exit_2_with_one_line(model_files, tmp_path: Path, capsys) -> None:
    text_file = tmp_path / "held.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n", encoding="utf-8")
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"not a model")
    model = str(model_files.lstm)
    cases = [
        ["--model", model],  # nothing to do
        ["--model", str(tmp_path / "missing.onnx"), "--data", str(text_file)],
        ["--model", str(not_onnx), "--data", str(text_file)],
        ["--model", model, "--data", str(tmp_path / "missing.txt")],
        ["--model", model, "--data", str(rows)],  # csv with two columns and no --column
        ["--model", model, "--data", str(rows), "--column", "nope"],
        ["--model", model, "--samples", "2", "--set", "temp=-1"],
        ["--model", model, "--samples", "2", "--set", "bogus=1"],
        ["--model", model, "--samples", "2", "--set", "temp"],
        ["--model", model, "--samples", "2", "--sweep", "top_p=0.5,2"],
        ["--model", model, "--samples", "2", "--sweep", "sampler=greedy,fancy"],
        ["--model", model, "--samples", "2", "--sweep", "sampler=beam"],
        ["--model", model, "--samples", "2", "--max-tokens", "0"],
        ["--model", model, "--samples", "2", "--seed", "-1"],
        ["--model", str(model_files.gpt), "--data", str(text_file), "--stride", "999"],
        ["--model", model, "--reference", str(text_file)],  # needs --samples
        ["--model", model, "--samples", "abc"],  # argparse
        ["--model", model, "--samples", "2", "--csv", str(tmp_path / "no-such-dir" / "out.csv")],
    ]
    for case in cases:
        code = main(case) if case[-1] != "abc" else _argparse_exit(case)
        err = capsys.readouterr().err.strip()
        assert code == 2, case
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (case, err)


def _argparse_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code)


def test_cli_subprocess_never_imports_torch(model_files, tmp_path: Path) -> None:
    text_file = tmp_path / "held.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    probe = (
        "import sys; from repl.evaluate import main; "
        f"code = main(['--model', {str(model_files.gru)!r}, '--data', {str(text_file)!r}, '--samples', '2', "
        "'--max-tokens', '5', '--json', '--device', 'cpu']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["perplexity"]["n_tokens"] == len(TEXT)
    bad = run_cli("--model", str(tmp_path / "missing.onnx"), "--data", str(text_file))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_novelty_by_hand() -> None:
    from runtime.textmetrics import Novelty

    novelty = Novelty(["emma\n  olivia  ", "The quick brown fox jumps"], n=4)
    samples = ["emma", "emmanuel", "olivia\n", "a quick brown FOX jumps high", "emma\nolivia", "   "]
    verbatim, copied = novelty.measure(samples)
    # found: "emma" (a line), "olivia" (a stripped line), "emma\nolivia" (a run of whole lines); not "emmanuel"
    # nor the sentence; the blank sample is not counted. 4-grams: only (quick, brown, fox, jumps) of 3 is copied.
    assert verbatim == pytest.approx(3 / 5)
    assert copied == pytest.approx(1 / 3)
    assert math.isnan(Novelty(["x"]).measure([])[0])


def test_eval_novelty_against_a_corpus_holding_the_samples_and_one_that_does_not(tmp_path: Path, capsys) -> None:
    from importlib.resources import files

    from repl.evaluate import main
    from runtime.evaluation import GenerationPlan, draw_samples
    from runtime.session import OnnxModel
    from runtime.settings import build_settings

    demo = OnnxModel.open(files("repl.demo") / "demo.onnx", device="cpu", threads=1)
    settings = build_settings(demo.info.generation, [("temperature", "0"), ("max_new_tokens", "60")])
    texts = draw_samples(demo, settings, GenerationPlan(2, "ROMEO:", 60, 0, 16)).texts
    holding, other = tmp_path / "holding.txt", tmp_path / "other.txt"
    holding.write_text("A first line.\n" + texts[0].strip() + "\nA last line.\n", encoding="utf-8")
    other.write_text("zebra quagga okapi\n", encoding="utf-8")
    args = ["--samples", "2", "--max-tokens", "60", "--set", "temperature=0", "--prompt", "ROMEO:", "--json",
            "--device", "cpu", "--threads", "1", "--novelty-n", "3"]
    shares = []
    for corpus in (holding, other):
        assert main([*args, "--novelty", str(corpus)]) == 0
        row = json.loads(capsys.readouterr().out)["sampling"]["rows"][0]
        shares.append((row["verbatim_share"], row["copied_ngram_share"]))
    assert shares == [(1.0, 1.0), (0.0, 0.0)]
    assert main([*args, "--novelty", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([*args, "--novelty", str(holding), "--novelty-n", "0"]) == 2
    assert "--novelty-n must be >= 1" in capsys.readouterr().err
