"""Sources: converters from real formats (OpenImages, COCO, LVIS) and the synthetic generator.

Each source is a generator of `Record`s handed to `writer.write_dataset`; the CPU-heavy
per-image work runs through `writer.parallel_map`. Import the submodule you need
(`data_shards.sources.openimages`, ...): nothing is imported here so that `import
data_shards.sources` stays free of PIL and tqdm.
"""

__all__ = ["common", "openimages", "coco", "lvis", "synthetic"]
