"""Data (docs/data.md#embedded-datasets): the embedded datasets (digits, shapes) and the webdataset shard format shared with real data.

digits.py / shapes.py generate the images and captions; shards.py writes and reads shards (make_loader,
load_eval_set, read_meta, decode_latents); embedded.py writes the embedded datasets once into a cache.
"""
