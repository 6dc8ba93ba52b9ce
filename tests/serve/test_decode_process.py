"""The decode loop in a child process (Engine(decode_process=True)): the same answers as the in-process
engine (greedy, seeded sampling, stop strings, streamed pieces), rows that wait for room and join a
running batch, cancellation, a dead child answered with 503s, the packed state's round trip, and the
configurations it refuses."""

from __future__ import annotations

import threading

import pytest
import torch

from medmllm.serve.decode import _prefill
from medmllm.serve.decode_process import pack_state, unpack_state
from medmllm.serve.engine import Delta, Done, Engine, Failed, SamplingParams
from medmllm.serve.errors import ServeError


@pytest.fixture(scope="module")
def image(tmp_path_factory, xray_png):
    path = tmp_path_factory.mktemp("decode_process") / "x.png"
    path.write_bytes(xray_png)
    return path


@pytest.fixture(scope="module")
def split_engine(model_dir, shapes):
    eng = Engine.from_pretrained(model_dir, model_id="tiny-test", shapes=shapes, max_batch=2, queue_size=8,
                                 decode_process=True).start()
    yield eng
    eng.close()


def _msg(text: str, image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": text}]}]


QUESTIONS = ["What is shown?", "Is there an effusion?", "Describe the image.", "Findings?", "Is the heart enlarged?"]


def _concurrently(engine, params, image) -> list[Done]:
    out: dict[int, Done] = {}
    threads = [threading.Thread(target=lambda i=i, q=q: out.__setitem__(i, engine.complete(_msg(q, image), params)))
               for i, q in enumerate(QUESTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [out[i] for i in range(len(QUESTIONS))]


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12),
                                    SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=7),
                                    SamplingParams(max_tokens=12, stop=("e",))],
                         ids=["greedy", "seeded", "stop"])
def test_answers_equal_the_in_process_engine(engine, split_engine, image, params):
    before = dict(split_engine.stats)
    got = _concurrently(split_engine, params, image)          # 5 requests, 2 rows at most: 3 wait and join
    want = [engine.complete(_msg(q, image), params) for q in QUESTIONS]
    assert [d.text for d in got] == [d.text for d in want]
    assert [d.finish_reason for d in got] == [d.finish_reason for d in want]
    assert [d.usage for d in got] == [d.usage for d in want]
    assert split_engine.stats["requests"] - before["requests"] == len(QUESTIONS)
    assert split_engine.stats["largest_batch"] <= 2
    assert split_engine.waiting == 0


def test_a_request_joins_the_running_batch(engine, split_engine, image):
    import queue

    long_q, short_q = _msg("Describe the image.", image), _msg("Findings?", image)
    long_ref = engine.complete(long_q, SamplingParams(max_tokens=300))
    assert long_ref.completion_tokens >= 100                  # the premise: the first row runs a while
    before = split_engine.stats["joined_running_batch"]
    first, second = queue.Queue(), queue.Queue()
    split_engine.submit(split_engine.prepare(long_q, SamplingParams(max_tokens=300)), first.put)
    assert isinstance(first.get(timeout=60), Delta)            # decoding
    split_engine.submit(split_engine.prepare(short_q, SamplingParams(max_tokens=3)), second.put, stream=False)
    done = []
    for box in (first, second):
        while not isinstance(ev := box.get(timeout=60), Done):
            pass
        done.append(ev)
    assert done[0].text == long_ref.text
    assert done[1].text == engine.complete(short_q, SamplingParams(max_tokens=3)).text
    assert split_engine.stats["joined_running_batch"] == before + 1


def test_streamed_pieces_make_the_answer(engine, split_engine, image):
    events = list(split_engine.stream(_msg("Describe the image.", image), SamplingParams(max_tokens=12)))
    assert isinstance(events[-1], Done) and all(isinstance(e, Delta) for e in events[:-1])
    assert "".join(e.text for e in events[:-1]) == events[-1].text
    assert events[-1].text == engine.complete(_msg("Describe the image.", image), SamplingParams(max_tokens=12)).text


def test_cancel_ends_the_row_early(split_engine, image):
    import queue

    events: queue.Queue = queue.Queue()
    prepared = split_engine.prepare(_msg("Describe the image.", image), SamplingParams(max_tokens=400))
    handle = split_engine.submit(prepared, events.put)
    assert isinstance(events.get(timeout=60), Delta)           # decoding has begun
    handle.cancel()
    while not isinstance(ev := events.get(timeout=60), Done):
        pass
    assert ev.finish_reason == "cancelled" and ev.completion_tokens < 400


def test_a_dead_decode_process_answers_503_and_reports_unhealthy(model_dir, shapes, image):
    import queue

    eng = Engine.from_pretrained(model_dir, shapes=shapes, decode_process=True).start()
    try:
        assert eng.alive
        events: queue.Queue = queue.Queue()
        eng.submit(eng.prepare(_msg("Describe the image.", image), SamplingParams(max_tokens=2000)), events.put)
        eng._proc._proc.kill()                                  # the child dies mid-answer
        ev = events.get(timeout=60)
        while isinstance(ev, Delta):
            ev = events.get(timeout=60)
        assert isinstance(ev, Failed) and ev.error.status == 503
        eng._proc._reader.join(10)
        assert not eng.alive
        with pytest.raises(ServeError) as exc:
            eng.submit(eng.prepare(_msg("Findings?", image), SamplingParams(max_tokens=4)), events.put)
        assert exc.value.status == 503
    finally:
        eng.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_state_round_trip(engine, image, dtype):
    prepared = engine.prepare(_msg("Findings?", image), SamplingParams(max_tokens=4))
    with torch.inference_mode():
        st = _prefill(engine.model, engine.collate([prepared], engine._prep_collator), [])
    for layer in st.cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    back = unpack_state(pack_state(st), row="the row")
    assert back.rows == ["the row"] and back.length == st.length and back.attention is None
    assert torch.equal(back.logits, st.logits) and torch.equal(back.next_pos, st.next_pos)
    for a, b in zip(back.cache.layers, st.cache.layers):
        assert a.keys.dtype == dtype and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    st.logits = torch.cat([st.logits, st.logits])
    with pytest.raises(ValueError, match="one-row"):
        pack_state(st)


def test_refused_configurations(model_dir, shapes):
    from medmllm.model.builders import tiny

    model, tok = tiny("llama", seed=0)
    with pytest.raises(ServeError, match="from a folder"):
        Engine(model, tok, shapes=shapes, decode_process=True)
    gemma, gtok = tiny("gemma", seed=0)
    with pytest.raises(ServeError, match="merged"):
        Engine(gemma, gtok, shapes=shapes, decode_process=True, source=model_dir)


def test_a_broken_state_fails_its_request_and_the_child_goes_on(split_engine, image):
    import queue

    broken = split_engine.prepare(_msg("Findings?", image), SamplingParams(max_tokens=3))
    broken.state = {"kv": [], "logits": None}                  # the child cannot rebuild this
    box: queue.Queue = queue.Queue()
    split_engine.submit(broken, box.put)
    ev = box.get(timeout=60)
    assert isinstance(ev, Failed) and ev.error.status == 500 and ev.error.code == "internal_error"
    assert split_engine.alive
    assert split_engine.complete(_msg("Findings?", image), SamplingParams(max_tokens=3)).completion_tokens == 3


def test_auto_decodes_in_a_child_where_it_can_and_here_where_it_cannot(model_dir, shapes):
    from medmllm.model.builders import tiny

    assert Engine.from_pretrained(model_dir, shapes=shapes, decode_process="auto").decode_process
    model, tok = tiny("llama", seed=0)
    assert not Engine(model, tok, shapes=shapes, decode_process="auto").decode_process          # no folder
    gemma, gtok = tiny("gemma", seed=0)
    assert not Engine(gemma, gtok, shapes=shapes, decode_process="auto", source=model_dir).decode_process
    with pytest.raises(ServeError, match="expected True, False or 'auto', got 'yes'"):
        Engine(model, tok, shapes=shapes, decode_process="yes")


def test_auto_decodes_here_when_the_child_fails_to_start(engine, model_dir, shapes, image, monkeypatch):
    from medmllm.serve.decode_process import DecodeProcess

    def refuse(self, timeout=300.0):
        raise ServeError(500, "the decode process could not load the model: test", "bad_config")

    monkeypatch.setattr(DecodeProcess, "start", refuse)
    with pytest.raises(ServeError, match="could not load"):
        Engine.from_pretrained(model_dir, shapes=shapes, decode_process=True).start()
    eng = Engine.from_pretrained(model_dir, shapes=shapes, decode_process="auto")
    assert eng.decode_process
    eng.start()
    try:
        assert not eng.decode_process and eng.alive
        params = SamplingParams(max_tokens=6)
        assert eng.complete(_msg("What is shown?", image), params).text == \
            engine.complete(_msg("What is shown?", image), params).text
    finally:
        eng.close()
