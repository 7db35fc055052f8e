"""runtime.generate (the decode loop, sessions), runtime.beam, runtime.textstream and runtime.settings, on tiny ONNX
fixture models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from runtime.generate import GenerationResult, Session, SessionError, kept_on_slide
from runtime.sampling import SamplerChain, SamplerSettings, SettingError
from runtime.session import OnnxModel
from runtime.settings import PRESETS, Settings
from runtime.textstream import TextStream, text_after


@pytest.fixture(scope="module")
def lstm(model_files) -> OnnxModel:
    return OnnxModel.open(model_files.lstm, device="cpu", threads=1)


@pytest.fixture(scope="module")
def gpt(model_files) -> OnnxModel:
    return OnnxModel.open(model_files.gpt, device="cpu", threads=1)


def _session(model: OnnxModel, **values) -> Session:
    settings = Settings(model.info.generation)
    for key, value in values.items():
        settings.set(key, value)
    return Session(model, settings)


def _greedy(model: OnnxModel, **values) -> Session:
    return _session(model, temperature=0, **values)


def _document(model: OnnxModel, prompt: str) -> list[int]:
    """The context a session's first prompt is fed as: the document separator (eos), then the prompt."""
    return [model.info.special.eos, *model.encode(prompt)]


def _reference_greedy(model: OnnxModel, context: list[int], count: int, ban_eos: bool = False) -> list[int]:
    """Oracle: greedy continuation computed by re-running the whole sequence from an empty state every step
    (no state is carried, so it checks the session's state handling independently)."""
    tokens = list(context)
    for _ in range(count):
        logits, _ = model.run(np.array([tokens], dtype=np.int64), model.initial_state(1), 0)
        row = logits[0].astype(np.float64)
        row[model.banned_ids] = -np.inf
        if ban_eos:
            row[model.info.special.eos] = -np.inf
        tokens.append(int(np.argmax(row)))
    return tokens[len(context):]


# ------------------------------------------------------------------------------------------- greedy and seeds


@pytest.mark.parametrize("model_path", ["lstm", "gru", "gpt", "exported-lstm", "exported-gru", "exported-gpt"],
                         indirect=True)
def test_greedy_matches_the_full_rerun_oracle(model_path):
    model = OnnxModel.open(model_path, device="cpu", threads=1)
    session = _greedy(model, max_new_tokens=8, min_new_tokens=8)  # 2 turns stay inside the GPT's 24 positions
    result = session.generate("ab, c")
    context = _document(model, "ab, c")
    assert result.tokens == _reference_greedy(model, context, 8, ban_eos=True)
    assert result.stop_reason == "max_tokens" and len(result.tokens) == 8
    assert result.prompt_tokens == 6  # eos + the 5 prompt characters
    assert session.history == context + result.tokens
    assert result.text == model.decode(result.tokens)
    # a second turn continues the same state: equal to the oracle on the whole history
    second = session.generate(" d", on_text=None)
    assert second.tokens == _reference_greedy(model, context + result.tokens + model.encode(" d"), 8, ban_eos=True)


@pytest.mark.parametrize("model_path", ["lstm", "gpt", "exported-gpt"], indirect=True)
def test_a_session_on_resident_state_generates_what_numpy_feeds_generate(model_path):
    """Sampled turns (seeded), n samples at once and beam search: the same tokens whether the state stays in
    onnxruntime values (IO binding, the CUDA path) or travels as numpy arrays."""
    outcomes = []
    for resident in (False, True):
        model = OnnxModel.open(model_path, device="cpu", threads=1, resident_state=resident)
        session = _session(model, seed=7, max_new_tokens=6, min_new_tokens=6)
        turns = [session.generate("ab, c", on_text=None).tokens, session.generate(" d", on_text=None).tokens]
        rows = [row.tokens for row in session.generate_n("b", 3)]
        beams = _greedy(model, num_beams=3, max_new_tokens=4, min_new_tokens=4).generate("ca", on_text=None).tokens
        outcomes.append((turns, rows, beams))
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0][1]) == 3 and all(len(row) == 6 for row in outcomes[0][1])


def test_greedy_is_deterministic_and_streams_the_same_text(lstm):
    pieces: list[str] = []
    first = _greedy(lstm, max_new_tokens=30).generate("abc", on_text=pieces.append)
    second = _greedy(lstm, max_new_tokens=30).generate("abc")
    assert first.tokens == second.tokens
    assert "".join(pieces) == first.text
    assert first.seconds > 0 and first.tokens_per_s > 0


def test_seed_reproduces_a_sampled_generation(lstm):
    one = _session(lstm, temperature=1.0, top_k=0, seed=7, max_new_tokens=40).generate("a")
    two = _session(lstm, temperature=1.0, top_k=0, seed=7, max_new_tokens=40).generate("a")
    other = _session(lstm, temperature=1.0, top_k=0, seed=8, max_new_tokens=40).generate("a")
    assert one.seed == 7 and one.tokens == two.tokens
    assert other.tokens != one.tokens


def test_a_drawn_seed_is_reported_and_reproduces(lstm):
    drawn = _session(lstm, temperature=1.0, max_new_tokens=30).generate("b")
    assert isinstance(drawn.seed, int)
    again = _session(lstm, temperature=1.0, max_new_tokens=30, seed=drawn.seed).generate("b")
    assert again.tokens == drawn.tokens


def test_max_new_tokens_and_padding_never_sampled(lstm):
    result = _session(lstm, temperature=5.0, top_k=0, seed=1, max_new_tokens=200).generate("a")
    assert len(result.tokens) <= 200
    assert not set(result.tokens) & set(lstm.banned_ids)
    if result.stop_reason == "max_tokens":
        assert len(result.tokens) == 200


def test_zero_max_new_tokens_only_feeds_the_prompt(lstm):
    session = _greedy(lstm, max_new_tokens=0)
    result = session.generate("abc")
    assert result.tokens == [] and result.text == "" and result.stop_reason == "max_tokens"
    assert session.generate_n("a", 2)[0].tokens == []
    session.settings.set("max_new_tokens", 6)
    assert session.generate("d").tokens == _reference_greedy(lstm, _document(lstm, "abcd"), 6)


def test_unseen_characters_in_the_prompt_become_unk(lstm):
    # Issue 16: a prompt of nothing but unknown text is refused (test below), so one known letter leads here.
    session = _greedy(lstm, max_new_tokens=5)
    notices: list[str] = []
    result = session.generate("aZü€", on_notice=notices.append)
    assert result.prompt_tokens == 5
    assert session.history[:5] == [lstm.info.special.eos, *lstm.encode("a")] + [lstm.info.special.unk] * 3
    assert notices == ["not in the model's vocabulary, read as unknown: Z ü €"]  # issue 17's notice


def test_a_prompt_of_only_unknown_words_is_refused_and_the_session_is_untouched(lstm):
    session = _greedy(lstm, max_new_tokens=3)
    with pytest.raises(SessionError, match=r"every word of the prompt is outside the model's vocabulary \('Z', 'ü'"):
        session.generate("Zü€ ")
    with pytest.raises(SessionError, match="outside the model's vocabulary"):
        session.generate_n("ZZZ", 2)
    assert session.history == [] and session.turns == []
    assert session.generate("a").prompt_tokens == 2  # and it goes on


def test_start_with_eos_off_feeds_the_prompt_as_it_is(lstm):
    """Issue 16: the setting (a model-file default; GPT-2 imported from Hugging Face: off) decides whether the
    first prompt follows the end-of-text separator. Off: the context is the prompt alone, as transformers'
    generate sees it; an empty prompt still starts from eos (something to condition on)."""
    session = _greedy(lstm, max_new_tokens=6, start_with_eos="off")
    result = session.generate("ab")
    assert session.history[:2] == lstm.encode("ab") and result.prompt_tokens == 2
    assert result.tokens == _reference_greedy(lstm, lstm.encode("ab"), 6)
    assert _greedy(lstm, max_new_tokens=6).generate("ab").tokens == _reference_greedy(lstm, _document(lstm, "ab"), 6)
    empty = _greedy(lstm, max_new_tokens=2, start_with_eos=False)
    empty.generate("")
    assert empty.history[0] == lstm.info.special.eos
    rows = _greedy(lstm, max_new_tokens=6, start_with_eos="off").generate_n("ab", 2)
    assert [row.tokens for row in rows] == [result.tokens] * 2 and rows[0].prompt_tokens == 2


def test_suppress_unk_never_generates_the_unknown_token(model_factory):
    """suppress_unk (word models' file default) bans <unk> from the sampling distribution, like padding."""
    path = model_factory("rnn", generation={"temperature": 1.0, "top_k": 0, "max_new_tokens": 8,
                                            "suppress_unk": True})
    model = OnnxModel.open(path, device="cpu", threads=1)
    unk = model.info.special.unk
    settings = Settings(model.info.generation)
    assert settings.get("suppress_unk") is True and Settings({}).get("suppress_unk") is False
    everything = model.info.vocab_size
    suppressed = {token for token, _, _ in Session(model, settings).next_token_probs(everything)}
    settings.set("suppress_unk", "off")
    free = {token: p for token, _, p in Session(model, settings).next_token_probs(everything)}
    assert free[unk] > 0 and unk not in suppressed and suppressed == set(free) - {unk}
    settings.set("suppress_unk", "on")
    settings.set("seed", 3)
    assert unk not in Session(model, settings).generate("ab").tokens


def test_start_with_eos_is_a_model_default_and_a_setting(model_factory):
    model = OnnxModel.open(model_factory("rnn", generation={"temperature": 0.0, "start_with_eos": False}),
                           device="cpu", threads=1)
    settings = Settings(model.info.generation)
    assert settings.get("start_with_eos") is False and settings.source("start_with_eos") == "model"
    assert settings.set("separator", "on") == ("start_with_eos", True)
    settings.unset("start_with_eos")
    assert settings.get("start_with_eos") is False
    assert Settings({}).get("start_with_eos") is True  # files written before the key: on, as they were trained
    with pytest.raises(SettingError, match="start_with_eos must be on or off"):
        settings.set("start_with_eos", "maybe")


def test_empty_prompt_starts_from_eos_then_continues(lstm):
    session = _greedy(lstm, max_new_tokens=6)
    first = session.generate("")
    assert session.history[0] == lstm.info.special.eos and first.prompt_tokens == 1
    second = session.generate("")
    assert second.prompt_tokens == 0
    assert second.tokens == _reference_greedy(lstm, session.history[:7], 6)


def test_the_first_prompt_starts_a_document(lstm):
    """Only a session's first prompt is conditioned on eos (the document separator); a prompt that already starts
    with it gets no second one; reset and undoing every turn start a new document."""
    session = _greedy(lstm, max_new_tokens=4)
    first = session.generate("ab")
    assert session.history[:3] == _document(lstm, "ab") and first.prompt_tokens == 3
    before = len(session.history)
    second = session.generate("c")
    assert second.prompt_tokens == 1 and session.history[before:before + 1] == lstm.encode("c")
    assert session.undo() and session.undo() and session.history == []
    assert session.generate("ab").tokens == first.tokens
    session.reset()
    session.generate("<|endoftext|>ab")
    assert session.history[:3] == _document(lstm, "ab")
    # generate_n follows the same convention: its greedy rows equal a first turn
    fresh = _greedy(lstm, max_new_tokens=4)
    assert [r.tokens for r in fresh.generate_n("ab", 2)] == [first.tokens] * 2
    assert fresh.generate_n("ab", 1)[0].prompt_tokens == 3


# ------------------------------------------------------------------------------------------- stopping


def test_eos_stops_and_is_not_in_the_text(model_files):
    model = OnnxModel.open(model_files.eager_eos, device="cpu", threads=1)
    result = _greedy(model, max_new_tokens=20).generate("ab")
    assert result.stop_reason == "eos"
    assert result.tokens == [model.info.special.eos] and result.text == ""


def test_min_new_tokens_bans_eos_until_reached(model_files):
    model = OnnxModel.open(model_files.eager_eos, device="cpu", threads=1)
    result = _greedy(model, max_new_tokens=20, min_new_tokens=5).generate("ab")
    assert result.stop_reason == "eos"
    assert len(result.tokens) == 6 and result.tokens[-1] == model.info.special.eos
    assert model.info.special.eos not in result.tokens[:5]


def test_stop_sequence_cuts_the_text_and_is_never_streamed(lstm):
    full = _greedy(lstm, max_new_tokens=40).generate("abc").text
    stop = full[12:14]
    expected = full[: full.index(stop)]
    pieces: list[str] = []
    result = _greedy(lstm, max_new_tokens=40, stop=stop).generate("abc", on_text=pieces.append)
    assert result.stop_reason == "stop_sequence"
    assert result.text == expected and "".join(pieces) == expected


def test_text_stream_holds_back_partial_stop_sequences():
    letters = "abcxyz"
    alphabet = {ch: i for i, ch in enumerate(letters)}

    def decode_ids(ids):
        return "".join(letters[i] for i in ids)

    pieces: list[str] = []
    stream = TextStream(decode_ids, ["xyz"], pieces.append)
    for char in "abxy":
        assert not stream.push(alphabet[char])
    assert "".join(pieces) == "ab"  # "xy" could still become "xyz"
    assert not stream.push(alphabet["a"])
    assert "".join(pieces) == "abxya"
    for char in "xyz":
        stopped = stream.push(alphabet[char])
    assert stopped and stream.text == "abxya" and "".join(pieces) == "abxya"


def test_text_stream_never_emits_half_characters():
    # byte-level BPE with no merges: every UTF-8 byte is its own token
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = "héllo wörld — 日本語 🙂!"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text)  # really split inside characters
    pieces: list[str] = []
    stream = TextStream(tokenizer.decode, (), pieces.append)
    for token in ids:
        stream.push(token)
    assert stream.finish() == text
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("split", [0, 3, 9, 14])
def test_text_after_equals_what_a_stream_ends_with(split):
    """generate_n decodes a row once at the end (text_after) instead of streaming it: same text, also when the
    context ends inside a character or a word-level tokenizer joins with spaces."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_level = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    words = Tokenizer(models.WordLevel(vocab={"a": 0, "bb": 1, "ccc": 2, "[UNK]": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    for tokenizer, text in ((byte_level, "naïve 日本 🙂 end"), (words, "a bb ccc a a bb ccc ccc bb a bb ccc a bb")):
        ids = tokenizer.encode(text).ids
        context, tokens = ids[:split], ids[split:]
        stream = TextStream(tokenizer.decode, (), None, context)
        for token in tokens:
            stream.push(token)
        assert text_after(tokenizer.decode, context, tokens) == stream.finish()


# ------------------------------------------------------------------------------------------- interruption


@pytest.mark.parametrize(("model_path", "budget"), [("lstm", 30), ("gpt", 8), ("exported-gpt", 8)],
                         indirect=["model_path"])
def test_interrupt_from_the_stream_keeps_a_consistent_state(model_path, budget):
    model = OnnxModel.open(model_path, device="cpu", threads=1)
    session = _greedy(model, max_new_tokens=budget, min_new_tokens=budget)
    seen: list[str] = []

    def interrupt_after_3(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result = session.generate("abc", on_text=interrupt_after_3)
    assert result.stop_reason == "interrupted"
    assert 3 <= len(result.tokens) < budget
    assert result.text.startswith("".join(seen))
    assert session.history == _document(model, "abc") + result.tokens
    following = session.generate("", on_text=None)
    assert following.tokens == _reference_greedy(model, session.history[: -len(following.tokens)], budget,
                                                 ban_eos=True)


def test_interrupt_inside_the_model_run_keeps_a_consistent_state(lstm, monkeypatch):
    session = _greedy(lstm, max_new_tokens=30)
    calls = [0]
    original_run = lstm.run

    def flaky_run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return original_run(*args, **kwargs)

    monkeypatch.setattr(lstm, "run", flaky_run)
    result = session.generate("ab")
    monkeypatch.undo()
    assert result.stop_reason == "interrupted" and len(result.tokens) == 7
    following = session.generate("c")
    context = session.history[: -len(following.tokens)]
    assert following.tokens == _reference_greedy(lstm, context, 30)


# ------------------------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("model_path", ["gpt", "exported-gpt"], indirect=True)
def test_gpt_window_slides_and_stays_exact(model_path):
    gpt = OnnxModel.open(model_path, device="cpu", threads=1)
    limit = gpt.info.context_length
    notices: list[str] = []
    session = _greedy(gpt, max_new_tokens=2 * limit, min_new_tokens=2 * limit)
    result = session.generate("abc", on_notice=notices.append)
    assert result.slid and len(result.tokens) == 2 * limit
    assert notices and notices[0] == f"context full: kept the last {kept_on_slide(limit)} tokens"
    # the distribution after the slid context equals a fresh run on exactly the kept tokens
    session.settings.set("min_new_tokens", 0)
    probs = session.next_token_probs(top=gpt.info.vocab_size)
    window = session.history[session.window_start:]
    assert 0 < session.window_start and len(window) <= limit
    logits, _ = gpt.run(np.array([window], dtype=np.int64), gpt.initial_state(1), 0)
    assert probs[0][0] == int(np.argmax(np.where(np.isin(np.arange(logits.shape[1]), gpt.banned_ids), -np.inf,
                                                 logits[0])))
    # greedy probabilities put everything on the argmax; use the real distribution too
    for key, value in {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}.items():
        session.settings.set(key, value)  # the plain softmax, whatever the model file's defaults say
    got = {token: p for token, _, p in session.next_token_probs(top=gpt.info.vocab_size)}
    row = logits[0].astype(np.float64)
    row[gpt.banned_ids] = -np.inf
    expected = np.exp(row - row.max())
    expected /= expected.sum()
    np.testing.assert_allclose([got.get(i, 0.0) for i in range(len(row))], expected, atol=1e-5)


def test_gpt_prompt_longer_than_the_context(gpt):
    limit = gpt.info.context_length
    notices: list[str] = []
    session = _greedy(gpt, max_new_tokens=5)
    result = session.generate("abcdefghij" * 4, on_notice=notices.append)
    assert result.slid and notices and len(result.tokens) == 5
    kept = session.history[session.window_start:-1]
    assert len(kept) <= limit


def test_rnn_never_slides(lstm):
    notices: list[str] = []
    result = _greedy(lstm, max_new_tokens=120).generate("ab" * 100, on_notice=notices.append)
    assert not result.slid and not notices


# ------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("model_path", ["lstm", "gpt", "exported-gpt"], indirect=True)
def test_generate_n_greedy_rows_equal_a_single_generation(model_path):
    model = OnnxModel.open(model_path, device="cpu", threads=1)
    session = _greedy(model, max_new_tokens=30)
    session.generate("ab")
    history = list(session.history)
    results = session.generate_n(" c", 3)
    assert len(results) == 3 and all(isinstance(r, GenerationResult) for r in results)
    assert session.history == history  # untouched
    single = session.generate(" c")
    for result in results:
        assert result.tokens == single.tokens and result.text == single.text


def test_generate_n_samples_independently_and_leaves_the_session_alone(lstm):
    session = _session(lstm, temperature=1.5, top_k=0, seed=3, max_new_tokens=25)
    session.settings.set("temperature", 0)
    before = session.generate("a")
    history = list(session.history)
    session.settings.set("temperature", 1.5)
    results = session.generate_n("b", 4)
    assert len({tuple(r.tokens) for r in results}) > 1
    for result in results:
        assert result.stop_reason in ("eos", "max_tokens")
        assert result.text == lstm.decode(result.tokens)
    assert session.history == history
    session.settings.set("temperature", 0)
    assert session.generate("b").tokens == _reference_greedy(lstm, history + lstm.encode("b"), 25)
    assert before.tokens


def test_generate_n_slides_on_gpt(gpt):
    session = _session(gpt, temperature=1.0, seed=5, max_new_tokens=40, min_new_tokens=40)
    notices: list[str] = []
    results = session.generate_n("abc", 2, on_notice=notices.append)
    assert len(results) == 2 and notices
    assert all(r.slid and len(r.tokens) == 40 and r.stop_reason == "max_tokens" for r in results)


def _record_steps(n: int) -> tuple[list[list[np.ndarray]], object]:
    """An on_step hook that files each reported distribution under its row: per_row[row] = one per token."""
    per_row: list[list[np.ndarray]] = [[] for _ in range(n)]

    def on_step(probabilities: np.ndarray, rows: np.ndarray) -> None:
        assert probabilities.shape[0] == len(rows) and probabilities.dtype == np.float64
        for distribution, row in zip(probabilities, rows, strict=True):
            per_row[int(row)].append(distribution.copy())

    return per_row, on_step


def test_generate_n_on_step_reports_each_sampling_distribution(lstm):
    session = _session(lstm, temperature=1.0, top_k=3, seed=5, max_new_tokens=12)
    plain = session.generate_n("ab", 5, batch_size=2)
    per_row, on_step = _record_steps(5)
    hooked = session.generate_n("ab", 5, batch_size=2, on_step=on_step)
    assert [r.tokens for r in hooked] == [r.tokens for r in plain]  # observing never changes what is drawn
    for result, reported in zip(hooked, per_row, strict=True):
        assert len(reported) == len(result.tokens)  # one report per generated token, none after the row ended
        for distribution, token in zip(reported, result.tokens, strict=True):
            assert distribution.sum() == pytest.approx(1.0)
            assert np.count_nonzero(distribution) <= 3 and distribution[token] > 0  # top_k 3; the drawn token
            assert not distribution[lstm.banned_ids].any()
    # the first step's distribution is the sampler chain's, after eos + prompt
    context = _document(lstm, "ab")
    logits, _ = lstm.run(np.array([context], dtype=np.int64), lstm.initial_state(1), 0)
    chain = SamplerChain(session.settings.sampler(), lstm.info.vocab_size, lstm.banned_ids)
    expected = chain.probabilities(logits, [context])[0]
    for reported in per_row:
        np.testing.assert_allclose(reported[0], expected, atol=1e-7)


def test_generate_n_on_step_greedy_is_a_point_mass_and_stops_with_the_row(model_files):
    model = OnnxModel.open(model_files.eager_eos, device="cpu", threads=1)
    per_row, on_step = _record_steps(3)
    results = _greedy(model, max_new_tokens=10, min_new_tokens=2).generate_n("ab", 3, on_step=on_step)
    eos = model.info.special.eos
    for result, reported in zip(results, per_row, strict=True):
        assert result.stop_reason == "eos" and len(result.tokens) == 3 and result.tokens[-1] == eos
        assert len(reported) == 3
        for distribution, token in zip(reported, result.tokens, strict=True):
            assert distribution[token] == 1.0 and distribution.sum() == 1.0


def test_generate_n_batches_continue_one_random_stream(lstm):
    session = _session(lstm, temperature=1.5, top_k=0, seed=9, max_new_tokens=15, min_new_tokens=15)
    batched = [r.tokens for r in session.generate_n("a", 4, batch_size=2)]
    assert batched[:2] != batched[2:]  # the second batch does not replay the first one's draws
    assert [r.tokens for r in session.generate_n("a", 4, batch_size=2)] == batched  # but the seed reproduces it
    with pytest.raises(ValueError):
        session.generate_n("a", 2, batch_size=0)


def test_generate_n_interrupt_starts_no_further_batch(lstm, monkeypatch):
    session = _greedy(lstm, max_new_tokens=10, min_new_tokens=10)
    calls = [0]
    original_run = lstm.run

    def flaky_run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the prompt, then the third step of the first batch
            raise KeyboardInterrupt
        return original_run(*args, **kwargs)

    monkeypatch.setattr(lstm, "run", flaky_run)
    results = session.generate_n("ab", 5, batch_size=2)
    monkeypatch.undo()
    assert [r.stop_reason for r in results] == ["interrupted"] * 5
    assert [len(r.tokens) for r in results] == [3, 3, 0, 0, 0] and calls[0] == 4
    assert results[0].tokens == _reference_greedy(lstm, _document(lstm, "ab"), 3, ban_eos=True)


# ------------------------------------------------------------------------------------------- turns


@pytest.mark.parametrize("model_path", ["lstm", "gpt", "exported-lstm"], indirect=True)
def test_undo_restores_the_previous_turn_exactly(model_path):
    model = OnnxModel.open(model_path, device="cpu", threads=1)
    session = _greedy(model, max_new_tokens=8)
    first = session.generate("ab")
    after_first = list(session.history)
    second = session.generate(" c")
    session.generate(" d")
    assert session.undo() and session.undo()
    assert session.history == after_first
    assert [prompt for prompt, _ in session.turns] == ["ab"]
    assert session.generate(" c").tokens == second.tokens
    assert session.turns[0][1] is first


def test_regen_replaces_the_last_turn(lstm):
    session = _session(lstm, temperature=1.0, seed=11, max_new_tokens=12)
    session.generate("ab")
    last = session.generate(" c")
    again = session.regen()
    assert again.tokens == last.tokens  # same seed, same settings
    assert len(session.turns) == 2
    session.settings.set("temperature", 0)
    greedy = session.regen()
    assert greedy.tokens == _reference_greedy(lstm, session.history[: -len(greedy.tokens)], 12)
    assert len(session.turns) == 2


def test_undo_and_regen_with_nothing_to_undo(lstm):
    session = _greedy(lstm)
    assert session.undo() is False
    with pytest.raises(SessionError):
        session.regen()


def test_reset_forgets_everything(lstm):
    session = _greedy(lstm, max_new_tokens=5)
    session.generate("abc")
    session.reset()
    assert session.history == [] and session.turns == []
    assert session.generate("abc").tokens == _greedy(lstm, max_new_tokens=5).generate("abc").tokens


def test_next_token_probs(lstm):
    session = _session(lstm, temperature=1.0, top_k=3)
    top = session.next_token_probs(5)
    assert len(top) == 3  # top_k 3 leaves three tokens with probability > 0, the rest come after
    top = session.next_token_probs(10)
    probs = [p for _, _, p in top]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-6
    assert all(isinstance(text, str) for _, text, _ in top)
    session.settings.set("temperature", 0)
    session.settings.set("max_new_tokens", 4)
    session.generate("abc")
    predicted = session.next_token_probs(1)[0][0]
    session.settings.set("max_new_tokens", 1)
    assert session.generate("").tokens == [predicted]  # greedy takes the most likely token shown


# ------------------------------------------------------------------------------------------- beam search


def _exhaustive_best(model: OnnxModel, context: list[int], steps: int, banned: set[int]) -> list[int]:
    """Highest summed log-probability over every sequence of ``steps`` allowed tokens."""
    allowed = [t for t in range(model.info.vocab_size) if t not in banned]
    sequences = np.array([context + list(seq) for seq in itertools.product(allowed, repeat=steps)], dtype=np.int64)
    logits, _ = model.run_all(sequences, model.initial_state(len(sequences)), 0)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    start = len(context) - 1
    scores = sum(log_probs[np.arange(len(sequences)), start + i, sequences[:, len(context) + i]] for i in range(steps))
    return sequences[int(np.argmax(scores)), len(context):].tolist()


@pytest.mark.parametrize(("prompt", "steps"), [("a", 3), ("b", 3), ("ab", 3), ("ba", 3), ("aab", 3), ("bba", 3),
                                              ("ab", 4), ("bba", 4)])
def test_beam_search_equals_exhaustive_search(model_files, prompt, steps):
    """With num_beams >= every prefix, beam search must find the best-scoring sequence (summed log-softmax; the
    prompts include cases where summing raw logits would pick another sequence)."""
    model = OnnxModel.open(model_files.tiny, device="cpu", threads=1)
    eos = model.info.special.eos
    choices = model.info.vocab_size - 1  # eos is banned by min_new_tokens for every step
    session = _greedy(model, num_beams=choices ** (steps - 1), max_new_tokens=steps, min_new_tokens=steps)
    result = session.generate(prompt)
    assert result.tokens == _exhaustive_best(model, _document(model, prompt), steps, {eos})
    assert result.stop_reason == "max_tokens"
    assert session.history == _document(model, prompt) + result.tokens
    # the beam tokens are pending context: the next turn continues after them exactly
    session.settings.set("num_beams", 1)
    following = session.generate("")
    assert following.tokens == _reference_greedy(model, session.history[: -len(following.tokens)], steps, ban_eos=True)


def test_beam_search_stops_at_eos(model_files):
    model = OnnxModel.open(model_files.eager_eos, device="cpu", threads=1)
    result = _greedy(model, num_beams=3, max_new_tokens=10).generate("ab")
    assert result.stop_reason == "eos" and result.text == "" and result.tokens == [model.info.special.eos]


def test_beam_search_respects_no_repeat_ngram(lstm):
    session = _greedy(lstm, num_beams=4, max_new_tokens=40, no_repeat_ngram_size=2)
    result = session.generate("ab")
    assert len(result.tokens) > 10
    pairs = list(zip(session.history, session.history[1:], strict=False))
    assert len(pairs) == len(set(pairs))
    streamed: list[str] = []
    sampled = _session(lstm, num_beams=3, temperature=1.0, seed=2, max_new_tokens=20).generate(
        "ab", on_text=streamed.append)
    assert "".join(streamed) == sampled.text and sampled.seed == 2
    again = _session(lstm, num_beams=3, temperature=1.0, seed=2, max_new_tokens=20).generate("ab")
    assert again.tokens == sampled.tokens


# ------------------------------------------------------------------------------------------- settings


def test_settings_sources_and_unset():
    settings = Settings({"temperature": 0.7, "max_new_tokens": 50, "top_k": "bad", "no_such_key": 1})
    assert settings.get("temperature") == 0.7 and settings.source("temperature") == "model"
    assert settings.get("max_tokens") == 50
    assert len(settings.warnings) == 2 and all("\n" not in w for w in settings.warnings)
    assert settings.set("temp", "0.3") == ("temperature", 0.3)
    assert settings.source("temperature") == "set"
    settings.set("top_p", "0.5", source="cli")
    assert settings.source("top_p") == "cli"
    settings.unset("temp")
    assert (settings.get("temperature"), settings.source("temperature")) == (0.7, "model")
    settings.unset("top_p")
    assert (settings.get("top_p"), settings.source("top_p")) == (1.0, "default")
    rows = {key: (value, source, changed) for key, value, source, changed in settings.rows()}
    assert rows["temperature"] == (0.7, "model", True) and rows["top_k"] == (50, "default", False)
    assert isinstance(settings.sampler(), SamplerSettings) and settings.sampler().temperature == 0.7


@pytest.mark.parametrize(("key", "value"), [
    ("temp", "-1"), ("top_p", "2"), ("top_k", "abc"), ("max_tokens", "-3"), ("num_beams", "0"),
    ("min_tokens", "x"), ("no_such_setting", "1"), ("seed", "-5"),
])
def test_settings_reject_bad_values_in_one_line(key, value):
    settings = Settings()
    with pytest.raises(SettingError) as caught:
        settings.set(key, value)
    assert "\n" not in str(caught.value) and str(caught.value)


def test_stop_sequences_seed_and_presets():
    settings = Settings({"temperature": 0.9})
    settings.add_stop("\\n\\n")
    settings.add_stop("END")
    assert settings.get("stop") == ["\n\n", "END"]
    settings.set("stop", "")
    assert settings.get("stop") == []
    settings.set("seed", "42")
    assert settings.get("seed") == 42 and settings.sampler().seed == 42
    settings.set("seed", "random")
    assert settings.get("seed") is None
    assert set(PRESETS) == {"greedy", "sample", "nucleus", "beam", "loop-guard"}
    settings.apply_preset("beam")
    assert (settings.get("num_beams"), settings.get("temperature"), settings.get("no_repeat_ngram_size")) == (4, 0, 2)
    settings.apply_preset("nucleus")
    assert (settings.get("top_k"), settings.get("top_p"), settings.get("temperature")) == (0, 0.9, 0.8)
    settings.apply_preset("sample")
    assert settings.get("temperature") == 0.9 and settings.source("temperature") == "model"
    assert settings.get("num_beams") == 1 and settings.get("top_p") == 1.0
    settings.apply_preset("loop-guard")
    assert settings.get("repetition_penalty") == 1.3 and settings.get("no_repeat_ngram_size") == 3
    with pytest.raises(SettingError):
        settings.apply_preset("bogus")


def test_model_do_sample_false_means_greedy():
    assert Settings({"do_sample": False, "temperature": 0.8}).get("temperature") == 0.0
    assert Settings({"temperature": 0.8, "do_sample": False}).get("temperature") == 0.0
    assert Settings({"temperature": 0.8, "do_sample": True}).get("temperature") == 0.8
