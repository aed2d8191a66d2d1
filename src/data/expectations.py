"""What the paper's setup expects of its shard folders, and what a pair of folders holds instead.

The paper (section 5.1 with the SD3 setup) trains at 256^2 on SD3-style autoencoder latents (factor 8, 16 channels)
with three frozen text encoders: CLIP L/14 and CLIP bigG/14 (77 tokens each, concatenated in channels to
768 + 1280 = 2048 and zero-padded to 4096) followed by T5-XXL (77 tokens of 4096), and the two CLIPs' pooled
vectors concatenated (2048). The evaluation split (COCO-2014) must be encoded like the training split; it is
normalised with the training split's statistics wherever it is read, so its own do not matter (one COCO folder serves
the ImageNet and the CC12M runs). `python -m src.plan` states every difference before anything is launched.
"""

from __future__ import annotations

from pathlib import Path

from src.data.shards import is_complete, read_meta

PAPER_DATA = {"latent_channels": 16, "latent_size": 32, "context_length": 154, "context_dim": 4096,
              "pooled_dim": 2048}
# Text encoder kinds in `text_groups` order (names "clip:<model>" / "t5:<model>", src/preprocess/text.py).
PAPER_TEXT_ENCODERS = ["clip", "clip", "t5"]
# What the evaluation split must share with the training split (shapes: the validation fails; encoders: the
# evaluation conditions on embeddings the model never saw): the planner names each difference, and a run is refused
# before launching (src.training.prepare.check_data). Not the latent statistics: the evaluation split is normalised
# with the training split's when read (src.data.shards.load_eval_set).
SAME_ENCODING = ("shapes", "autoencoder", "autoencoder_sha256", "encoder_names", "encoder_sha256", "text_groups")
# Compared only where both folders record them (folders written before they existed lack them).
RECORDED_SINCE = ("autoencoder_sha256", "encoder_sha256")
# meta.json's encoder_sha256 names QuickGELU where a CLIP's sidecar turns it on (src.preprocess.text.clip_digest);
# folders written since also record each encoder's files alone under this key, as encoder_sha256 of a folder written
# before (which lacks the key) recorded every CLIP.
ENCODER_FILES_SHA256 = "encoder_files_sha256"


def paper_differences(meta: dict) -> list[str]:
    """How a training folder's meta.json differs from the paper's setup (empty: it matches)."""
    out = [f"{key} {meta.get(key)} (paper: {want})" for key, want in PAPER_DATA.items() if meta.get(key) != want]
    groups = meta.get("text_groups") or []
    kinds = [str(g.get("name", "")).split(":", 1)[0] for g in groups]
    if kinds != PAPER_TEXT_ENCODERS:
        names = ", ".join(str(g.get("name")) for g in groups) or "none recorded"
        out.append(f"text groups {names} (paper: CLIP L/14, CLIP bigG/14, T5-XXL)")
    return out


def split_differences(train_meta: dict, eval_meta: dict, keys=SAME_ENCODING) -> list[str]:
    """What the evaluation folder does not share with the training folder of `keys` (empty: consistent)."""
    train_meta, eval_meta = _same_digests(train_meta, eval_meta)
    return [f"{key} {eval_meta.get(key)!r} vs training {train_meta.get(key)!r}"
            for key in keys if eval_meta.get(key) != train_meta.get(key)
            and not (key in RECORDED_SINCE and None in (eval_meta.get(key), train_meta.get(key)))]


def _same_digests(train_meta: dict, eval_meta: dict) -> tuple[dict, dict]:
    """The pair with encoder_sha256 of one kind: the files' alone where one folder was written before the digests
    named QuickGELU (a CLIP with a QuickGELU sidecar has another digest in each)."""
    written_since = [ENCODER_FILES_SHA256 in m for m in (train_meta, eval_meta)]
    if written_since[0] == written_since[1]:
        return train_meta, eval_meta
    files = lambda m: {**m, "encoder_sha256": m[ENCODER_FILES_SHA256]} if ENCODER_FILES_SHA256 in m else m  # noqa
    return files(train_meta), files(eval_meta)


def check_shard_folders(train_dir: str | Path, eval_dir: str | Path) -> list[str]:
    """One line per problem found in a pair of existing shard folders; folders not (yet) there are not checked."""
    if not is_complete(train_dir):
        return []
    train = read_meta(train_dir)
    notes = []
    diffs = paper_differences(train)
    if diffs:
        notes.append(f"data.train_dir={train_dir} differs from the paper's setup: {'; '.join(diffs)}")
    if is_complete(eval_dir):
        diffs = split_differences(train, read_meta(eval_dir))
        if diffs:
            notes.append(f"data.eval_dir={eval_dir} is not encoded like data.train_dir ({'; '.join(diffs)}): "
                         "preprocess it with the same models and --stats-from the training folder")
    return notes
