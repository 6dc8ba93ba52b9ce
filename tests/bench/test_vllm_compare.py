"""bench/vllm_compare.py's pieces, without vLLM (behaviour, never speed): the x-ray record files, medmllm's
side of the token comparison checked against transformers' Llava on the exported folder, the parsing of
vLLM's token-id log-probabilities, and the figures the comparison reports."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def bench(bench_script):
    return bench_script("vllm_compare")


@pytest.fixture(scope="module")
def xray(bench, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_compare")
    return work, bench.xray_records(work, cases=40)


@pytest.fixture(scope="module")
def model_and_export(bench_script, tmp_path_factory):
    """The serve bench's exportable model (random weights), saved, with its hf_llava export."""
    out = tmp_path_factory.mktemp("vllm_compare_model") / "llava"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench_script("serve_load").build_model(out, "llava")
    finally:
        torch.set_num_threads(threads)
    return out, out / "hf_llava"


def test_xray_records_keep_only_xray_and_resolve_their_files(xray):
    from medmllm.data.records import read_records, resolve_path

    work, (base, train, test) = xray
    assert train.parent == base == test.parent
    for path in (train, test):
        records = read_records(path)[0]
        assert records and all(r["meta"]["modality"] == "xray" for r in records)
        part = next(p for p in records[0]["messages"][0]["content"] if p["type"] == "image")
        assert resolve_path(part, base).is_file()
    everything = read_records(base / "test.jsonl")[0]
    assert len(read_records(test)[0]) == sum(r["meta"]["modality"] == "xray" for r in everything) < len(everything)


def test_medmllm_tokens_match_transformers_llava_on_the_export(bench, xray, model_and_export):
    """medmllm's greedy ids and teacher-forced log-probabilities equal those of transformers' Llava loaded
    from the export (the reference implementation), on a real MedPhantom record."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from medmllm.data.collate import flatten_content
    from medmllm.data.records import read_records, resolve_path
    from medmllm.data.tokenizers import load_tokenizer
    from medmllm.model.mllm import MedMLLM

    _, (base, _, test) = xray
    model_dir, export = model_and_export
    record = read_records(test)[0][0]
    model, tok = MedMLLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    ours = bench.medmllm_tokens(model, tok, record, base, forced=[5, 9, 40, 41], max_tokens=4)
    assert len(ours["ids"]) == 4                       # the bench model never ends its turn
    assert ours["image_effect"] > 1e-3                 # blank images move the log-probabilities: the image counts

    llava, proc = LlavaForConditionalGeneration.from_pretrained(export).eval(), AutoProcessor.from_pretrained(export)
    content = record["messages"][0]["content"]
    image = Image.open(resolve_path(next(p for p in content if p["type"] == "image"), base)).convert("RGB")
    prompt = proc.apply_chat_template([{"role": "user", "content": flatten_content(content)}],
                                      add_generation_prompt=True)
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    assert ours["prompt_tokens"] == inputs["input_ids"].shape[1]
    with torch.no_grad():
        greedy = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        forced = torch.tensor([[5, 9, 40, 41]])
        logits = llava(input_ids=torch.cat([inputs["input_ids"], forced], 1),
                       pixel_values=inputs["pixel_values"]).logits[0, -5:-1]
    assert ours["ids"] == greedy.tolist()
    theirs = torch.log_softmax(logits, -1).gather(1, forced[0, :, None])[:, 0]
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), theirs, atol=1e-5, rtol=0)


def test_endpoint_tokens_reads_vllm_token_ids(bench):
    class FakeVLLM:
        body = None

        def request_body(self, record, base_dir, gen):
            return {"model": "m", "messages": [], "max_tokens": gen["max_new_tokens"]}

        def post(self, body):
            FakeVLLM.body = body
            content = [{"token": "token_id:17", "logprob": -0.5}, {"token": "token_id:1", "logprob": -0.01}]
            return {"choices": [{"logprobs": {"content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 90}}

    out = bench.endpoint_tokens(FakeVLLM(), {}, ".", 8)
    assert FakeVLLM.body["logprobs"] is True and FakeVLLM.body["return_tokens_as_token_ids"] is True
    assert out == {"prompt_tokens": 90, "ids": [17, 1], "logprobs": [-0.5, -0.01], "finish_reason": "stop"}


def test_compare_tokens_cuts_at_end_of_turn_and_finds_the_first_difference(bench):
    ours = {"prompt_tokens": 90, "ids": [4, 5, 6], "logprobs": [-0.1, -0.2, -0.3], "image_effect": 0.2}
    same = bench.compare_tokens(ours, {"prompt_tokens": 90, "ids": [4, 5, 6, 1], "logprobs": [-0.1, -0.2, -0.35]},
                                eos={1})
    assert same == {"prompt_tokens_equal": True, "ids_equal": True, "same_prefix": 3,
                    "max_abs_logprob_diff": pytest.approx(0.05), "image_effect": 0.2}
    other = bench.compare_tokens(ours, {"prompt_tokens": 91, "ids": [4, 7, 6], "logprobs": [-0.1, -0.2, -0.3]},
                                 eos={1})
    assert other["same_prefix"] == 1 and not other["ids_equal"] and not other["prompt_tokens_equal"]


def test_summarise_counts_agreement_and_scores_each_side(bench):
    records = [{"meta": {"answer": "yes", "answer_type": "closed"}}, {"meta": {"answer": "no", "answer_type": "closed"}}]
    tokens = [{"prompt_tokens_equal": True, "ids_equal": True, "max_abs_logprob_diff": 1e-6, "image_effect": 0.1},
              {"prompt_tokens_equal": True, "ids_equal": False, "max_abs_logprob_diff": 3e-6, "image_effect": 0.3}]
    s = bench.summarise(records, ["yes", "yes"], ["yes", "no"], tokens, blank=["no", "yes"])
    assert s["answers_equal"] == 1 and s["answers_equal_share"] == 0.5
    assert s["exact_accuracy"] == {"medmllm": 0.5, "vllm": 1.0}
    assert s["token_ids_equal"] == 1 and s["max_abs_logprob_diff"] == 3e-6
    assert s["median_image_effect"] == pytest.approx(0.2) and s["answers_changed_by_blank_images"] == 1
