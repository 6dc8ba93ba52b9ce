"""bench/train_throughput.py's HF-side pieces (behaviour, never speed): LlavaSFTCollator, fed by the
exported LlavaProcessor, gives the batch medmllm's MultimodalCollator gives on the same records (ids with
<image> expanded, attention, labels on the answer tokens only, pixels within 8-bit rounding);
token_lengths agrees with both; image_records keeps single-image records only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medmllm.data.collate import MultimodalCollator
from medmllm.data.dataset import ModalityShapes, PartLoader, RecordDataset
from medmllm.data.records import make_record, media, write_records
from medmllm.data.tokenizers import build_tokenizer
from medmllm.errors import InputError

SIZE, PATCH = 32, 8                     # 4 x 4 = 16 image tokens
META = {"dataset": "toy", "split": "train"}
QA = [("Is there a pleural effusion?", "yes"),
      ("Describe the image.", "The lungs are clear. There is no pneumothorax.")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bench_script):
    """Two records over grayscale PNGs of different shapes, a tiny exportable model and its export."""
    from transformers import LlavaProcessor

    from medmllm.model.export import export_hf_llava

    bench = bench_script("train_throughput")
    tmp = tmp_path_factory.mktemp("collate")
    rng = np.random.default_rng(0)
    records = []
    for i, ((q, a), shape) in enumerate(zip(QA, [(40, 40), (48, 30)])):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp / f"img{i}.png")
        records.append(make_record(f"r{i}", [media("image", f"img{i}.png"), q], a, META))
    tok = build_tokenizer("llama3")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # tiny models: one thread; two spin-wait on shared busy cores
    model = bench.build_model(tok, image_size=SIZE, patch=PATCH,
                              tower=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4),
                              llm=dict(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    processor = LlavaProcessor.from_pretrained(export_hf_llava(model, tok, tmp / "llava"))
    loader = PartLoader(ModalityShapes(image_size=SIZE, image_channels=3))
    yield bench, tmp, records, tok, model, processor, loader
    torch.set_num_threads(threads)


def _both(setup, max_length=512):
    bench, tmp, records, tok, model, processor, loader = setup
    ds = RecordDataset(records, loader, base_dir=tmp)
    ours = MultimodalCollator(tok, max_length, model.num_tokens)([ds[i] for i in range(len(records))])
    collate = bench.LlavaSFTCollator(processor, lambda part: loader(part, tmp)[0], max_length)
    theirs = collate([{"record": json.dumps(r)} for r in records])
    return ours, theirs


def test_hf_batch_equals_medmllm_batch(setup):
    ours, theirs = _both(setup)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert torch.equal(theirs["labels"], ours["labels"])
    # pixels: the same [0, 1] images, through 8-bit RGB and the exported processor's rescale
    torch.testing.assert_close(theirs["pixel_values"], ours["modality_inputs"]["image"], atol=0.5 / 255 + 1e-6,
                               rtol=0)


def test_expansion_and_label_mask_are_the_expected_ones(setup):
    _, _, records, tok, *_ = setup
    _, theirs = _both(setup)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ((theirs["input_ids"] == image_id).sum(1) == (SIZE // PATCH) ** 2).all()   # 16 copies per row
    lengths = theirs["attention_mask"].sum(1)
    assert lengths[0] < lengths[1] == theirs["input_ids"].shape[1]                   # row 0 right-padded
    for b, (_, answer) in enumerate(QA):
        labelled = theirs["labels"][b][theirs["labels"][b] != -100]
        assert tok.decode(labelled) == answer + tok.eos_token                          # answer + end of turn
        assert not (theirs["labels"][b][lengths[b]:] != -100).any()


def test_token_lengths_match_the_collated_rows(setup):
    bench, _, records, tok, *_ = setup
    ours, _ = _both(setup)
    assert bench.token_lengths(records, tok, (SIZE // PATCH) ** 2) == ours["attention_mask"].sum(1).tolist()


def test_batch_longer_than_max_length_is_an_input_error(setup):
    with pytest.raises(InputError, match="max_length"):
        _both(setup, max_length=40)


def test_image_records_keeps_single_image_records(setup, tmp_path):
    bench = setup[0]
    recs = [make_record("one", [media("image", "a.png"), "Q?"], "A.", META),
            make_record("two", [media("image", "a.png"), media("image", "b.png"), "Q?"], "A.", META),
            make_record("ecg", [media("signal", "a.hea"), "Q?"], "A.", META)]
    write_records(tmp_path / "train.jsonl", recs)
    assert [r["id"] for r in bench.image_records(tmp_path / "train.jsonl")] == ["one"]
