from data_shards.format import ClassInfo, Record
from data_shards.storage import read_bytes, read_manifest
from data_shards.writer import write_dataset


def test_write_dataset_to_s3(s3_bucket):
    root = f"{s3_bucket}/ds"
    classes = [ClassInfo(id=f"/m/{i}", name=f"c{i}") for i in range(4)]
    recs = [Record(key=f"k{i}", image=bytes([i]) * 50, pos=[i % 4], neg=[]) for i in range(7)]
    write_dataset(root, classes, {"train": recs}, shard_samples=3)
    m = read_manifest(root)
    assert [s.samples for s in m.splits["train"].shards] == [3, 3, 1]
    assert len(read_bytes(f"{root}/train/train-000002.tar")) == m.splits["train"].shards[2].bytes
