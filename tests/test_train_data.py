"""The trainer's data layer: shard discovery, mixing, splitting by rank/worker, expansion, resume."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import webdataset as wds

from perceptio.errors import PerceptioError
from perceptio.tokens import D_END, D_START, SEG, codes_from_tokens
from perceptio.train.data import (
    ExampleReader,
    PromptTemplates,
    ReaderSlot,
    ResumableLoader,
    expand_sample,
    find_shards,
    parse_mix,
    plan_mix,
    sample_split_notes,
)
from perceptio.train.config import StreamConfig
from tests.train_factory import make_sample, write_shards


class FakeProcessor:
    """Stands in for the model's processor: keeps what the data layer is responsible for."""

    def encode_conversation(self, image, turns, masks, depth, span_is_context=False, hidden_cells=()):
        return {"prompt": turns[-2].text, "target": turns[-1].text, "has_mask": bool(masks), "depth_shape": depth.shape}

    def collate(self, encoded):
        return encoded


def keys(examples):
    return [example.key for example in examples]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, "refcoco-unc", shards=3, images_per_shard=4, first_image_id=1)
    write_shards(root, "refcocog-umd", shards=2, images_per_shard=4, first_image_id=101)
    write_shards(root, "ade20k", split="training", shards=2, images_per_shard=6, first_image_id=201, question=True)
    write_shards(root, "refcoco-unc", split="val", shards=1, images_per_shard=2, first_image_id=301)
    return root


def test_find_shards_keeps_training_splits_only(mixed_shards):
    shards = find_shards([mixed_shards])
    assert Counter(s.dataset for s in shards) == {"refcoco-unc": 3, "refcocog-umd": 2, "ade20k": 2}
    assert {s.split for s in shards} == {"train", "training"}
    with pytest.raises(PerceptioError, match="no shards"):
        find_shards([mixed_shards], splits=("testB",))
    with pytest.raises(PerceptioError, match="does not exist"):
        find_shards([mixed_shards / "missing"])


def test_mix_matches_full_names_and_families(tmp_path):
    for dataset in ("refcoco-unc", "refcoco-google", "refcoco+-unc", "refcocog-umd"):
        write_shards(tmp_path, dataset, shards=1, images_per_shard=1)
    shards = find_shards([tmp_path])
    streams = {s.name: s for s in plan_mix(shards, parse_mix("refcoco=1, refcocog=2"))}
    assert streams["refcoco"].datasets == ("refcoco-google", "refcoco-unc")  # not refcoco+ nor refcocog
    assert streams["refcocog"].datasets == ("refcocog-umd",) and streams["refcocog"].weight == 2.0
    # The full name wins over the family; weight 0 leaves a stream out.
    streams = {s.name: s for s in plan_mix(shards, parse_mix("refcoco=1,refcoco-google=0,refcoco+=1"))}
    assert set(streams) == {"refcoco", "refcoco+"} and streams["refcoco"].datasets == ("refcoco-unc",)
    # Without a mix every dataset is its own stream of weight 1.
    assert [s.name for s in plan_mix(shards, None)] == ["refcoco+-unc", "refcoco-google", "refcoco-unc", "refcocog-umd"]
    with pytest.raises(PerceptioError, match="no shard matches"):
        plan_mix(shards, parse_mix("refclef=1"))
    for bad in ("refcoco", "refcoco=-1", "refcoco=x", "refcoco=0", ""):
        with pytest.raises(PerceptioError):
            parse_mix(bad)


def test_expansion_one_example_per_sentence_and_questions():
    templates = PromptTemplates.load()
    sample = make_sample("refcoco-unc", "train", 7, refs=2, sentences=3)
    raw = {"__key__": sample.key, **sample.to_members()}
    examples = expand_sample(raw, templates)
    assert len(examples) == 6 and len(set(keys(examples))) == 6
    for example, (ref, sentence) in zip(examples, [(r, s) for r in sample.meta["refs"] for s in r["sentences"]]):
        assert sentence["sent"] in example.prompt and example.source == "refcoco-unc"
        assert example.target.startswith(SEG + D_START) and example.target.endswith(ref["description"])
        span = example.target[len(SEG) : example.target.index(D_END) + len(D_END)]
        tokens = [D_START] + [f"[{t}" for t in span[len(D_START) : -len(D_END)].split("[") if t] + [D_END]
        assert codes_from_tokens(tokens) == sample.depth_tokens.tolist()
        assert example.mask_rle == ref["mask"] and example.image_bytes == sample.jpg

    question = make_sample("ade20k", "training", 4, question=True)
    (example,) = expand_sample({"__key__": question.key, **question.to_members()}, templates)
    assert example.image_bytes == question.marked_jpg and example.mask_rle is None
    assert question.meta["question"]["text"] in example.prompt
    assert example.target.startswith(D_START) and example.target.endswith(D_END + "(B)")  # image 4 -> "ABC"[1]

    without_depth = expand_sample(raw, templates, use_depth_tokens=False)
    assert all(D_START not in e.target and e.target.startswith(SEG) for e in without_depth)
    decoded = examples[0].decode()
    assert decoded["image"].size == (64, 48) and [mask.shape for mask in decoded["masks"]] == [(48, 64)]
    assert decoded["depth"].dtype == np.float32 and decoded["depth"].shape == (320, 320)


def test_stream_order_is_a_function_of_the_seed(mixed_shards):
    def first(seed, count=40):
        config = StreamConfig([mixed_shards], seed=seed, shuffle_buffer=16, shuffle_initial=8)
        streams = plan_mix(find_shards(config.shards), None)
        return keys(islice(ExampleReader(streams, ReaderSlot(), config), count))

    assert first(3) == first(3)
    assert first(3) != first(4)
    assert Counter(first(3, 400)) != Counter(first(3, 40) * 10)  # more than one epoch, reshuffled


def test_mix_weights_are_respected(mixed_shards):
    config = StreamConfig([mixed_shards], mix=parse_mix("refcoco=1,refcocog=1,ade20k=2"), shuffle_buffer=8, shuffle_initial=4)
    streams = plan_mix(find_shards(config.shards), config.mix)
    draws = 2000
    counts = Counter(example.source for example in islice(ExampleReader(streams, ReaderSlot(), config), draws))
    assert set(counts) == {"refcoco-unc", "refcocog-umd", "ade20k"}
    for source, share in (("refcoco-unc", 0.25), ("refcocog-umd", 0.25), ("ade20k", 0.5)):
        # 5 binomial standard deviations: a wrong weighting (e.g. by stream size) lands far outside.
        assert abs(counts[source] / draws - share) < 5 * np.sqrt(share * (1 - share) / draws), counts


def test_uneven_shards_give_every_rank_endless_disjoint_streams(mixed_shards):
    config = StreamConfig([mixed_shards], mix={"refcoco": 1.0}, shuffle_buffer=1, shuffle_initial=1)
    streams = plan_mix(find_shards(config.shards), config.mix)  # 3 shards of refcoco-unc for 2 ranks
    per_epoch = []
    for rank in range(2):
        reader = ExampleReader(streams, ReaderSlot(rank=rank, world_size=2), config)
        taken = keys(islice(reader, 100))  # several epochs of this rank's 1 or 2 shards: never runs dry
        assert len(taken) == 100
        epoch0 = ExampleReader(streams, ReaderSlot(rank=rank, world_size=2), config)
        examples = [(next(epoch0).key, epoch0.state()["streams"]["refcoco"]["epoch"]) for _ in range(100)]
        per_epoch.append({key for key, epoch in examples if epoch == 0})
    all_keys = {e.key for p in find_shards([mixed_shards]) if p.dataset == "refcoco-unc"
                for raw in wds.tarfile_samples([{"url": str(p.path)}])
                for e in expand_sample(raw, PromptTemplates.load())}
    assert per_epoch[0].isdisjoint(per_epoch[1]) and per_epoch[0] | per_epoch[1] == all_keys
    # The same number of steps on both ranks, through the real loader.
    for rank in range(2):
        loader = ResumableLoader(config, FakeProcessor(), batch_size=2, rank=rank, world_size=2)
        assert len(list(islice(loader, 20))) == 20


def test_fewer_shards_than_readers_are_shared_sample_by_sample(mixed_shards):
    config = StreamConfig([mixed_shards], mix={"refcocog": 1.0}, shuffle_buffer=1, shuffle_initial=1)
    streams = plan_mix(find_shards(config.shards), config.mix)  # 2 shards for 2 ranks x 2 workers
    (note,) = sample_split_notes(streams, world_size=2, num_workers=2)
    assert "'refcocog': 2 shard(s)" in note and "keeps one sample in 4" in note and "--samples-per-shard" in note
    assert sample_split_notes(streams, world_size=1, num_workers=2) == []
    per_reader = []
    for rank in range(2):
        for worker in range(2):
            reader = ExampleReader(streams, ReaderSlot(rank=rank, world_size=2, worker=worker, num_workers=2), config)
            examples = [(next(reader).key, reader.state()["streams"]["refcocog"]["epoch"]) for _ in range(60)]
            per_reader.append({key.split("/", 1)[0] for key, epoch in examples if epoch == 0})
    images = {raw["__key__"] for p in find_shards([mixed_shards]) if p.dataset == "refcocog-umd"
              for raw in wds.tarfile_samples([{"url": str(p.path)}])}
    assert all(a.isdisjoint(b) for i, a in enumerate(per_reader) for b in per_reader[i + 1 :])
    assert set().union(*per_reader) == images
    loader = ResumableLoader(config, FakeProcessor(), batch_size=2, num_workers=2, world_size=2)
    assert len(list(islice(loader, 4))) == 4


def test_a_parent_folder_finds_every_dataset_below_it(tmp_path):
    write_shards(tmp_path / "refcoco-unc", "refcoco-unc", shards=2, images_per_shard=2)
    write_shards(tmp_path / "ade20k", "ade20k", split="training", shards=1, images_per_shard=2, question=True)
    (tmp_path / "notes").mkdir()  # a folder without shards is not a dataset
    assert Counter(shard.dataset for shard in find_shards([tmp_path])) == {"refcoco-unc": 2, "ade20k": 1}
    assert [shard.dataset for shard in find_shards([tmp_path / "ade20k"])] == ["ade20k"]


def test_sample_dataset_must_match_its_file_name(tmp_path):
    write_shards(tmp_path, "refcoco-unc", shards=1, images_per_shard=1)
    (tmp_path / "refcoco-unc-train-000000.tar").rename(tmp_path / "ade20k-training-000000.tar")
    config = StreamConfig([tmp_path])
    with pytest.raises(PerceptioError, match="says dataset 'refcoco-unc'"):
        next(ExampleReader(plan_mix(find_shards(config.shards), None), ReaderSlot(), config))


def test_resumed_loader_continues_with_the_same_batches(mixed_shards):
    config = StreamConfig([mixed_shards], mix=parse_mix("refcoco=1,ade20k=1"), seed=5, shuffle_buffer=6, shuffle_initial=3)

    def loader(states=None):
        return ResumableLoader(config, FakeProcessor(), batch_size=2, num_workers=2, states=states)

    def content(batches):
        return [(batch.keys, [e["target"] for e in batch.inputs]) for batch in batches]

    straight = content(islice(loader(), 12))
    first = loader()
    head = content(islice(first, 7))  # an odd count: worker 1 is due next
    state = json.loads(json.dumps(first.state_dict()))  # it travels through a checkpoint as JSON
    assert state["next_worker"] == 1
    tail = content(islice(loader([state]), 5))
    assert head + tail == straight
    with pytest.raises(PerceptioError, match=r"has 2 loader readers .* at most that many ranks x --workers \(got 1 x 3\)"):
        ResumableLoader(config, FakeProcessor(), num_workers=3, states=[state])


def _per_reader(batches) -> dict[int, list[str]]:
    keys: dict[int, list[str]] = {}
    for batch in batches:
        keys.setdefault(batch.reader, []).extend(batch.keys)
    return keys


@pytest.mark.parametrize("before, after", [((2, 0), (1, 0)), ((1, 2), (2, 0)), ((2, 0), (1, 2))],
                         ids=["2->1 ranks", "1->2 ranks", "2 ranks->1 rank x 2 workers"])
def test_elastic_resume_goes_on_with_every_reader_without_repeating_or_skipping(mixed_shards, before, after):
    """A run restarted on another number of ranks (or workers) continues each reader's sequence."""
    config = StreamConfig([mixed_shards], mix=parse_mix("refcoco=1,ade20k=1"), seed=2, shuffle_buffer=4, shuffle_initial=2)

    def loaders(world_size, workers, states=None):
        return [ResumableLoader(config, FakeProcessor(), batch_size=2, num_workers=workers, rank=rank,
                                world_size=world_size, states=states) for rank in range(world_size)]

    # Every reader's own sequence, from a run that never stops (readers of the first layout).
    straight: dict[int, list[str]] = {}
    for loader in loaders(*before):
        for reader, keys in _per_reader(islice(loader, 12)).items():
            straight.setdefault(reader, []).extend(keys)
    first = loaders(*before)
    consumed: dict[int, list[str]] = {}
    for loader in first:
        for reader, keys in _per_reader(islice(loader, 3)).items():
            consumed.setdefault(reader, []).extend(keys)
    states = json.loads(json.dumps([loader.state_dict() for loader in first]))  # as gathered into a checkpoint
    for loader in loaders(*after, states=states):
        for reader, keys in _per_reader(islice(loader, 4)).items():
            consumed.setdefault(reader, []).extend(keys)
    assert set(consumed) == set(straight) == {0, 1}
    for reader, keys in consumed.items():
        assert keys == straight[reader][: len(keys)], reader  # nothing repeated, nothing skipped
    assert sum(map(len, consumed.values())) == 2 * (3 * before[0] + 4 * after[0])


def test_expanded_examples_train_on_the_target_only(vqvae_dir):
    """Through the tiny model's encode_example: labels hold exactly the target (+ end of turn)."""
    import torch

    from perceptio.train.config import PerceptioConfig
    from perceptio.train.model import PerceptioModel

    torch.manual_seed(0)
    model = PerceptioModel.from_config(PerceptioConfig(model="tiny", tokenizer=str(vqvae_dir), lora_rank=4))
    templates = PromptTemplates.load()
    for sample in (make_sample("refcoco-unc", "train", 3, refs=1, sentences=1), make_sample("ade20k", "training", 5, question=True)):
        (example,) = expand_sample({"__key__": sample.key, **sample.to_members()}, templates)
        encoded = model.processor.encode_conversation(**example.decode())
        labels, input_ids = encoded["labels"], encoded["input_ids"]
        supervised = labels != -100
        first = int(supervised.nonzero()[0])
        assert not supervised[:first].any() and supervised[first:].all()  # the prompt, then the target
        assert torch.equal(labels[first:], input_ids[first:])
        target = model.tokenizer.decode(labels[first:].tolist())
        assert target == example.target + model.processor.end_of_turn()
        assert example.prompt in model.tokenizer.decode(input_ids[:first].tolist())


def test_the_saved_buffer_shuffles_exactly_as_webdataset():
    """The reader's own shuffle buffer makes webdataset's draws, so seeking keeps today's order."""
    import random

    from perceptio.train.data import _shuffled

    for size, initial, count in [(6, 3, 50), (1000, 100, 30), (4, 10, 17), (1, 1, 5)]:
        ours = list(_shuffled(iter(range(count)), [], size, initial, random.Random(f"{size}")))
        theirs = list(wds.shuffle(size, initial, rng=random.Random(f"{size}"))(iter(range(count))))
        assert ours == theirs and sorted(ours) == list(range(count))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    write_shards(root, "refcoco-unc", shards=8, images_per_shard=3, first_image_id=1)  # 12 examples a shard
    return root


def test_reading_questions_are_new_each_epoch_and_a_resumed_reader_draws_the_same(tmp_path):
    write_shards(tmp_path, "ade20k", split="training", shards=2, images_per_shard=3, questions=True)
    config = StreamConfig([tmp_path], seed=2, shuffle_buffer=6, shuffle_initial=3, reading_questions=3)
    streams = plan_mix(find_shards(config.shards), None)

    def asked(examples):
        return [(example.key, example.marks, example.target) for example in examples]

    straight = asked(islice(ExampleReader(streams, ReaderSlot(), config), 40))
    first_epoch = {key: marks for key, marks, _ in straight if "/r" in key}
    later = [(key, marks) for key, marks, _ in straight if "/r" in key and key in first_epoch]
    assert len(first_epoch) >= 6 and any(first_epoch[key] != marks for key, marks in later[len(first_epoch):])
    # Resumed in the second epoch (past its start), the reader draws that epoch's questions again.
    first = ExampleReader(streams, ReaderSlot(), config)
    head = asked(islice(first, 27))
    state = json.loads(json.dumps(first.state()))
    assert state["streams"]["ade20k"]["epoch"] >= 1
    assert head + asked(islice(ExampleReader(streams, ReaderSlot(), config, state=state), 13)) == straight


def test_resume_seeks_past_whole_shards_to_the_same_next_examples(many_shards, monkeypatch):
    """Mid-epoch: the reader rebuilt by seeking gives the very examples the replay gives (and the
    uninterrupted reader), opening only the cursor's shard and those of the buffered examples."""
    from perceptio import fs
    from perceptio.train import data as data_module

    config = StreamConfig([many_shards], seed=4, shuffle_buffer=6, shuffle_initial=3)
    streams = plan_mix(find_shards(config.shards), None)
    straight = keys(islice(ExampleReader(streams, ReaderSlot(), config), 80))
    first = ExampleReader(streams, ReaderSlot(), config)
    assert keys(islice(first, 61)) == straight[:61]
    state = json.loads(json.dumps(first.state()))  # through a checkpoint, as JSON
    seek = state["streams"]["refcoco-unc"]["seek"]
    replay_state = json.loads(json.dumps(state))
    del replay_state["streams"]["refcoco-unc"]["seek"]

    opened, expanded = [], []
    original_open, original_expand = fs.open_input, data_module.expand_sample
    monkeypatch.setattr(fs, "open_input", lambda url: opened.append(str(url)) or original_open(url))
    monkeypatch.setattr(data_module, "expand_sample",
                        lambda raw, *args: expanded.append(raw["__key__"]) or original_expand(raw, *args))

    seeking = ExampleReader(streams, ReaderSlot(), config, state)
    order = seeking._readers[0]._shards  # this epoch's shard order of the reader
    cursor_shard, cursor_sample, _ = seek["cursor"]
    buffered = {(shard, sample) for shard, sample, _ in seek["buffer"]}
    assert cursor_shard >= 4  # the position is deep in the epoch
    # Opened: the shards holding buffered examples and the cursor's, never the others before it.
    assert set(opened) == {order[shard] for shard, _ in buffered} | {order[cursor_shard]}
    assert set(order[:cursor_shard]) - set(opened)  # whole shards before the position skipped unopened
    # Decoded: the samples of buffered examples and the cursor's sample, once each, nothing else.
    assert len(expanded) == len(set(expanded)) == len(buffered | {(cursor_shard, cursor_sample)})
    seek_next = keys(islice(seeking, 19))

    opened.clear()
    replaying = ExampleReader(streams, ReaderSlot(), config, replay_state)
    assert set(order[: cursor_shard + 1]) <= set(opened)  # the replay reads every shard up to the position
    assert seek_next == keys(islice(replaying, 19)) == straight[61:80]
    assert replaying.state()["streams"]["refcoco-unc"]["read"] == seeking.state()["streams"]["refcoco-unc"]["read"]


def test_the_reader_shortens_reading_spans_in_the_curriculums_epochs_only(tmp_path):
    """--reading-short-spans reaches the examples through the reader: the first epoch's reading
    questions hide all but 16 cells, the second's all but 36, later epochs' none; curated questions never."""
    write_shards(tmp_path, "ade20k", split="training", shards=2, images_per_shard=3, questions=True)
    config = StreamConfig([tmp_path], seed=2, shuffle_buffer=1, shuffle_initial=1, reading_questions=3,
                          reading_short_spans=(16, 36))
    reader = ExampleReader(plan_mix(find_shards(config.shards), None), ReaderSlot(), config)
    hidden_by_epoch: dict[int, set[int]] = {}
    for example in islice(reader, 200):
        epoch = reader.state()["streams"]["ade20k"]["epoch"]
        if "/r" in example.key:
            hidden_by_epoch.setdefault(epoch, set()).add(len(example.hidden_cells))
        else:
            assert not example.hidden_cells
    assert max(hidden_by_epoch) >= 3
    # The one-example buffer may hand on the last example of the epoch before.
    assert hidden_by_epoch[0] == {84} and hidden_by_epoch[1] <= {84, 64} and 64 in hidden_by_epoch[1]
    assert all(hidden_by_epoch[epoch] <= {0} for epoch in hidden_by_epoch if epoch >= 3)
