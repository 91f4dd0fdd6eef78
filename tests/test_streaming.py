"""`--streaming` and WebDataset-style tar shards: local shards of tiny PNGs written by the tests, read through
`datasets` (`load_dataset("webdataset", data_files=..., streaming=True)`). Checked: the split across processes and
DataLoader workers (every example once per epoch, none twice), per-example randomness keyed by the example's name (the
same crop and mask whatever process or worker reads it), corrupt members under --on_bad_image, and the arguments a
stream refuses. The 2-process run is `slow` (tests/test_distributed.py's harness)."""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import run_mim
from modeling_simmim.data import (
    KeyedMasks,
    StreamingImageDataset,
    UnreadableImage,
    UnreadableImageError,
    build_pretrain_transform,
    load_image_datasets,
)
from modeling_simmim.masking import SimMIMMaskGenerator

TINY_STREAM = [
    "--model_preset",
    "swin_test",
    "--mask_patch_size",
    "16",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--use_cpu",
    "true",
    "--seed",
    "0",
    "--dataset_name",
    "webdataset",
    "--streaming",
    "true",
]


def write_shards(folder, num_shards: int, per_shard: int, corrupt: tuple[str, ...] = ()) -> list[str]:
    """`train-{i}.tar` shards of 16x16 PNGs (distinct pixels) with a class file each; returns every sample's name
    "train-{i}.tar/{key}". Keys in `corrupt` get bytes that are not an image."""
    os.makedirs(folder, exist_ok=True)
    names = []
    rng = np.random.default_rng(0)
    for shard in range(num_shards):
        with tarfile.open(os.path.join(folder, f"train-{shard}.tar"), "w") as tar:
            for item in range(per_shard):
                key = f"s{shard}_{item:03d}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
                members = {
                    "png": b"not an image" if key in corrupt else buffer.getvalue(),
                    "cls": str(item % 3).encode(),
                }
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                names.append(f"train-{shard}.tar/{key}")
    return names


def _streaming_dataset(folder, on_bad_image="skip", shuffle_buffer_size=0) -> StreamingImageDataset:
    loaded = load_image_datasets(dataset_name="webdataset", data_files=os.path.join(folder, "*.tar"), streaming=True)
    assert loaded.image_column == "png"
    return StreamingImageDataset(
        loaded.datasets["train"],
        loaded.image_column,
        build_pretrain_transform(32),
        on_bad_image=on_bad_image,
        keyed_fn=KeyedMasks(SimMIMMaskGenerator(32, 16, 4, 0.6)),
        shuffle_buffer_size=shuffle_buffer_size,
    )


def _examples(dataset, num_workers: int = 0) -> dict[str, dict]:
    """name -> example, read through a DataLoader with `num_workers` workers (names from the keyed index)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return {
        str(example.index if isinstance(example, UnreadableImage) else example["example_key"].index): example
        for example in loader
    }


def test_processes_and_workers_read_every_example_once_with_the_same_randomness(tmp_path):
    """4 shards x 3 samples: one process alone, and each of 2 processes with 2 workers (one shard per worker): the
    parts are disjoint and cover the stream; an example's crop, flip and mask are the same wherever it is read, and
    change with the epoch."""
    write_shards(tmp_path, 4, 3)
    stream = _streaming_dataset(tmp_path, shuffle_buffer_size=4)
    alone = _examples(stream.for_process(seed=5, rank=0, world_size=1))
    parts = [_examples(stream.for_process(seed=5, rank=rank, world_size=2), num_workers=2) for rank in (0, 1)]
    assert len(alone) == 12 and len(parts[0]) == len(parts[1]) == 6
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(alone)
    for part in parts:
        for name, example in part.items():
            torch.testing.assert_close(example["pixel_values"], alone[name]["pixel_values"], rtol=0, atol=0)
            assert torch.equal(example["bool_masked_pos"], alone[name]["bool_masked_pos"])
    next_epoch = stream.for_process(seed=5, rank=0, world_size=1)
    next_epoch.set_epoch(1)
    later = _examples(next_epoch)
    assert set(later) == set(alone)  # an example's name does not change with the epoch, its randomness does
    assert all(later[name]["example_key"].epoch == 1 for name in later)
    assert sum(not torch.equal(later[name]["bool_masked_pos"], alone[name]["bool_masked_pos"]) for name in alone) > 6


def test_shuffled_stream_order_is_a_function_of_the_seed_and_epoch(tmp_path):
    write_shards(tmp_path, 4, 3)
    stream = _streaming_dataset(tmp_path, shuffle_buffer_size=6)

    def order(seed, epoch):
        part = stream.for_process(seed=seed, rank=0, world_size=1)
        part.set_epoch(epoch)
        return [float(example["pixel_values"].sum()) for example in part]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)


def test_corrupt_tar_member_is_skipped_or_named(tmp_path, caplog):
    write_shards(tmp_path, 2, 2, corrupt=("s1_001",))
    with caplog.at_level("WARNING", logger="modeling_simmim.data"):
        examples = list(_streaming_dataset(tmp_path).for_process(seed=0, rank=0, world_size=1))
    unreadable = [example for example in examples if isinstance(example, UnreadableImage)]
    assert len(examples) == 4 and [example.name for example in unreadable] == ["train-1.tar/s1_001"]
    assert "train-1.tar/s1_001" in caplog.text
    with pytest.raises(UnreadableImageError, match=r"train-1.tar/s1_001.*--on_bad_image skip"):
        list(_streaming_dataset(tmp_path, on_bad_image="error").for_process(seed=0, rank=0, world_size=1))


def test_stream_arguments_that_cannot_work_fail_before_loading(tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    files = ["--data_files", str(tmp_path / "*.tar")]
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        run_mim.main([*TINY_STREAM, *files, *out])
    with pytest.raises(ValueError, match="--warmup_steps"):
        run_mim.main([*TINY_STREAM, *files, "--max_steps", "2", *out])
    with pytest.raises(ValueError, match="--save_strategy epoch"):
        run_mim.main(
            [*TINY_STREAM, *files, "--max_steps", "2", "--warmup_steps", "1", "--save_strategy", "epoch", *out]
        )
    with pytest.raises(ValueError, match="--streaming reads --dataset_name"):
        run_mim.main([*TINY_STREAM[:-4], "--streaming", "true", "--max_steps", "2", "--warmup_steps", "1", *out])
    with pytest.raises(ValueError, match="--train_val_split"):
        load_image_datasets(dataset_name="webdataset", data_files=files[1], streaming=True, train_val_split=0.1)


def test_data_files_that_match_nothing_are_named(tmp_path):
    pattern = str(tmp_path / "missing-*.tar")
    with pytest.raises(FileNotFoundError, match="--data_files"):
        load_image_datasets(dataset_name="webdataset", data_files=pattern, streaming=True)


def test_streamed_pretraining_runs_one_process(tmp_path):
    """run_mim.py on tar shards, streamed: trains --max_steps steps (over an epoch boundary), counts the corrupt
    member once, saves the model and a reconstruction of the stream's first images."""
    write_shards(tmp_path / "shards", 2, 3, corrupt=("s0_002",))
    out = str(tmp_path / "out")
    results = run_mim.main(
        [
            *TINY_STREAM,
            "--data_files",
            str(tmp_path / "shards" / "*.tar"),
            "--max_steps",
            "4",
            "--warmup_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
            "--torch_num_threads",
            "1",
            "--output_dir",
            out,
        ]
    )
    assert results["num_skipped_images"] == 1 and results["epoch"] > 1
    assert "train_samples" not in results
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert glob.glob(os.path.join(out, "reconstructions", "step_*.png"))


@pytest.mark.slow
def test_two_processes_stream_tar_shards_each_example_once_per_epoch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 run_mim.py --dataset_name webdataset --data_files ...
    --streaming --use_cpu true`, 2 DataLoader workers per process: 8 shards x 3 samples (one corrupt), 2 per batch;
    the launch probe records every example each process's workers hand out. In the first epoch every example is read
    exactly once over both processes; the corrupt one is skipped and counted once."""
    from test_distributed import launch

    names = write_shards(tmp_path / "shards", 8, 3, corrupt=("s5_001",))
    out = str(tmp_path / "out")
    probe = tmp_path / "probe"
    # 12 examples per process, 6 per worker: 3 full batches per worker, 6 optimizer steps per epoch; 8 steps cross
    # into the second epoch.
    args = [
        *TINY_STREAM,
        "--data_files",
        str(tmp_path / "shards" / "*.tar"),
        "--max_steps",
        "8",
        "--warmup_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--dataloader_num_workers",
        "2",
        "--save_strategy",
        "no",
        "--output_dir",
        out,
    ]
    launch("accelerate", 2, "run_mim.py", args, probe)
    seen = collections.defaultdict(list)  # (rank, epoch) -> names
    for path in glob.glob(str(probe / "stream_rank*_pid*.txt")):
        rank = int(os.path.basename(path).split("_")[1][len("rank") :])
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                epoch, name = line.rstrip("\n").split("\t")
                seen[rank, int(epoch)].append(name)
    first = [seen[0, 0], seen[1, 0]]
    for part in first:
        assert len(part) == len(set(part)) == 12, sorted(part)
    assert set(first[0]).isdisjoint(first[1]) and set(first[0]) | set(first[1]) == set(names)
    assert seen[0, 1] or seen[1, 1]  # the second epoch started
    with open(os.path.join(out, "all_results.json"), encoding="utf-8") as handle:
        all_results = json.load(handle)
    assert all_results["num_skipped_images"] == 1


def test_streamed_validation_split_is_its_first_examples_in_memory():
    import datasets

    from modeling_simmim.data import LoadedImageData

    rows = datasets.Dataset.from_dict({"image": [f"img{i}.png" for i in range(5)]})
    streams = datasets.IterableDatasetDict(
        {"validation": rows.to_iterable_dataset(), "extra": rows.to_iterable_dataset()}
    )
    loaded = LoadedImageData(streams, "image", None, "test")
    args = run_mim.parse_args(["--output_dir", "unused", "--max_eval_samples", "3"])
    run_mim.materialize_streamed_splits(loaded, args[1], args[2])
    assert list(loaded.datasets) == ["validation"] and loaded.datasets["validation"]["image"] == [
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    loaded = LoadedImageData(
        datasets.IterableDatasetDict({"validation": rows.to_iterable_dataset()}), "image", None, "test"
    )
    args = run_mim.parse_args(["--output_dir", "unused"])
    with pytest.raises(ValueError, match="--max_eval_samples"):
        run_mim.materialize_streamed_splits(loaded, args[1], args[2])


# ---- exact resume --------------------------------------------------------------------------------------------------
def _names_collator(examples):
    return {"names": [example["example_key"].index for example in examples]}


def _stream_batches(loader, epoch: int, limit: int | None = None) -> list[list[int]]:
    loader.set_epoch(epoch)
    batches = []
    if limit == 0:
        return batches
    for batch in loader:
        batches.append(batch["names"])
        if limit is not None and len(batches) == limit:
            break
    return batches


@pytest.mark.parametrize("num_workers", [0, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_stream_loader_resumes_every_position_in_the_uninterrupted_order(tmp_path, num_workers):
    """5 shards of 4 samples, batches of 2: with 2 or 3 workers the workers hold different numbers of shards, so they
    run out at different turns. Stopped after any number k of batches of the second pass, a loader resumed from the
    saved position gives the remaining batches of the uninterrupted pass, then the next pass as it would. Stopped at
    the end of the pass, it goes on with the next pass at once (the Trainer ends training at a pass without batches),
    and the passes after are shifted by one."""
    from modeling_simmim.streaming import StreamDataLoader, StreamPosition

    write_shards(tmp_path, 5, 4)
    stream = _streaming_dataset(tmp_path, shuffle_buffer_size=3).for_process(seed=1, rank=0, world_size=1)

    def loader():
        return StreamDataLoader(
            stream, collate_fn=_names_collator, batch_size=2, num_workers=num_workers, drop_last=True
        )

    reference = _stream_batches(loader(), 1)
    following = _stream_batches(loader(), 2)
    assert len(reference) == 10 and sorted(sum(reference, [])) == sorted(sum(following, []))
    after_following = _stream_batches(loader(), 3)
    for stop in range(len(reference) + 1):
        first = loader()
        assert _stream_batches(first, 1, limit=stop) == reference[:stop]
        position = first.position()
        assert position.epoch == 1 and sum(position.batches) == stop
        position.save(str(tmp_path / f"checkpoint-{stop}"), 0)
        resumed = loader()
        resumed.resume_from(StreamPosition.load(str(tmp_path / f"checkpoint-{stop}"), 0))
        if stop < len(reference):
            assert _stream_batches(resumed, 0) == reference[stop:], f"stopped after {stop} batches"
            assert _stream_batches(resumed, 1) == following
        else:
            assert _stream_batches(resumed, 0) == following
            assert _stream_batches(resumed, 1) == after_following


def test_stream_position_refuses_another_launch(tmp_path):
    from modeling_simmim.streaming import StreamPosition

    position = StreamPosition(epoch=1, batches=(2, 1), last_worker=0, batch_size=4, num_workers=2, world_size=1)
    with pytest.raises(ValueError, match="--dataloader_num_workers 2 --per_device_train_batch_size 4 on 1"):
        position.check_resumable(batch_size=4, num_workers=0, world_size=1, checkpoint="checkpoint-9")
    with pytest.raises(FileNotFoundError, match="--ignore_data_skip true"):
        StreamPosition.load(str(tmp_path), process_index=1)


def _run_logs(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return [(entry["step"], entry["loss"]) for entry in json.load(handle)["log_history"] if "loss" in entry]


def test_streamed_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """1 process, 2 DataLoader workers over 3 shards of 4 samples (worker 0 reads 2 shards, worker 1 one), batches of
    2: 6 optimizer steps per pass, 10 steps. Killed (SIGKILL) at step 7, the run resumes from checkpoint-6, the end of
    the first pass; killed at step 10, from checkpoint-9, mid-way through the second pass with worker 0 ahead. Both
    end with the weights and losses of an uninterrupted run, bitwise."""
    import multiprocessing

    import kill_at_step
    from safetensors.torch import load_file
    from test_reproducibility import _assert_bitwise_equal

    def killed_at(step, output_dir):
        def child():
            kill_at_step.install(step)
            run_mim.main([*argv, "--output_dir", output_dir])

        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
            process.join()
        return process.exitcode

    write_shards(tmp_path / "shards", 3, 4)
    argv = [
        *TINY_STREAM,
        "--data_files",
        str(tmp_path / "shards" / "*.tar"),
        "--max_steps",
        "10",
        "--warmup_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--dataloader_num_workers",
        "2",
        "--shuffle_buffer_size",
        "3",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--torch_num_threads",
        "1",
        "--base_learning_rate",
        "0.05",
        "--backbone_config_overrides",
        '{"drop_path_rate": 0.1}',
    ]
    reference = str(tmp_path / "reference")
    run_mim.main([*argv, "--output_dir", reference])
    for kill_step, resumed_from in ((7, "checkpoint-6"), (10, "checkpoint-9")):
        killed = str(tmp_path / f"killed_at_{kill_step}")
        assert killed_at(kill_step, killed) == -9  # SIGKILL
        assert max(os.listdir(killed), key=lambda name: (name.startswith("checkpoint-"), name)) == resumed_from
        run_mim.main([*argv, "--output_dir", killed])
        _assert_bitwise_equal(
            load_file(os.path.join(reference, "model.safetensors")),
            load_file(os.path.join(killed, "model.safetensors")),
        )
        assert _run_logs(killed) == _run_logs(reference) and len(_run_logs(reference)) == 10


@pytest.mark.slow
def test_two_processes_resume_a_stream_exactly(tmp_path):
    """`accelerate launch` with 2 processes x 2 DataLoader workers over 10 shards of 3 samples (5 shards per process:
    its workers read 3 and 2 of them, 4 and 3 batches of 2), 7 optimizer steps per pass, 12 steps. The run's output
    folder, cut back to checkpoint-10 (3 batches into the second pass, worker 0 one batch ahead), resumes with the
    same command and ends with the weights and losses of the whole run, bitwise."""
    import shutil

    from safetensors.torch import load_file
    from test_distributed import launch
    from test_reproducibility import _assert_bitwise_equal

    write_shards(tmp_path / "shards", 10, 3)
    whole = str(tmp_path / "whole")
    args = [
        *TINY_STREAM,
        "--data_files",
        str(tmp_path / "shards" / "*.tar"),
        "--max_steps",
        "12",
        "--warmup_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--dataloader_num_workers",
        "2",
        "--shuffle_buffer_size",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "5",
        "--base_learning_rate",
        "0.05",
    ]
    launch("accelerate", 2, "run_mim.py", [*args, "--output_dir", whole], tmp_path / "probe_whole")
    for rank in (0, 1):
        position = json.load(open(os.path.join(whole, "checkpoint-10", f"stream_state_{rank}.json"), encoding="utf-8"))
        assert position["epoch"] == 1 and position["batches"] == [2, 1] and position["last_worker"] == 0
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(whole, "checkpoint-10"), os.path.join(resumed, "checkpoint-10"))
    launch("accelerate", 2, "run_mim.py", [*args, "--output_dir", resumed], tmp_path / "probe_resumed")
    _assert_bitwise_equal(
        load_file(os.path.join(whole, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    )
    assert _run_logs(resumed) == _run_logs(whole) and len(_run_logs(whole)) == 12
