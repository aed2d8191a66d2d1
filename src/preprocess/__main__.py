"""Command line: python -m src.preprocess {imagenet,cc12m,coco} [options]; see --help of each."""

from __future__ import annotations

import argparse
import sys

from src.preprocess.pipeline import PreprocessConfig, preprocess
from src.preprocess.sources import CAPTION_CHOICES, CocoSource, ImageNetSource, TarSource, TsvSource
from src.utils.io import first_line, refused_write

#: Where the model files' checksums are remembered: src.run's paths.cache_dir default, from the same directory.
DEFAULT_CACHE_DIR = ".cache"

EXAMPLE = """example:
  python -m src.preprocess imagenet --root /data/imagenet/train --class-names /data/imagenet/LOC_synset_mapping.txt \\
      --out /data/shards/imagenet-256 --resolution 256 --autoencoder /models/sd-vae \\
      --clip ViT-L-14-quickgelu /models/clip-l14.bin --clip ViT-bigG-14 /models/bigg.bin --t5 /models/t5-v1_1-xxl
"""


def common_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every dataset."""
    p.add_argument("--out", required=True, help="output shard folder (created; a rerun resumes it)")
    p.add_argument("--resolution", type=int, default=256, help="image side after resize + centre crop (256)")
    p.add_argument("--autoencoder", default="identity",
                   help="diffusers AutoencoderKL folder (or a pipeline folder with vae/), a single weights file "
                        "with --autoencoder-config, or 'identity' for pixel space (default)")
    p.add_argument("--autoencoder-config", default=None, help="folder with config.json for a single-file autoencoder")
    p.add_argument("--latent", choices=("mean", "sample"), default="mean",
                   help="posterior mean (default) or a per-image seeded sample of the AutoencoderKL")
    p.add_argument("--clip", nargs=2, action="append", metavar=("MODEL", "WEIGHTS"), required=True,
                   help="an open_clip text encoder: model name (or model config .json) and local weights; "
                        "repeat for several (concatenated along channels, SD3)")
    p.add_argument("--t5", default=None, help="local transformers T5 encoder folder (model + tokenizer)")
    p.add_argument("--t5-length", type=int, default=77, help="T5 tokens (77)")
    p.add_argument("--chunk-size", type=int, default=1000, help="samples per chunk = per shard (1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (64)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding and resizing (4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item order, captions and latent samples (0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="write items in sorted source order (default: a seeded random order)")
    p.add_argument("--stats-from", default=None,
                   help="a complete shard folder, made with the same autoencoder and --latent, whose latent mean/std "
                        "this set uses (an eval set reusing training's)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="text encoders' precision (float32)")
    p.add_argument("--autoencoder-precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autoencoder precision (float32; SD-style VAEs overflow in float16)")
    p.add_argument("--text-cache", type=int, default=2048, help="captions whose embeddings are memoised (0: off)")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (rerun to go on)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="where the model files' checksums are remembered, so a resume, another part or the next "
                        "folder does not read the weights again to name them (.cache, as src.run's paths.cache_dir)")
    p.add_argument("--part", type=part_spec, default=(0, 1), metavar="I/N",
                   help="do part I of N of the job (chunks c with c %% N == I) into the same --out, e.g. one SLURM "
                        "array task each (--array=0-15): --part $SLURM_ARRAY_TASK_ID/16; the last part to finish "
                        "assembles")


def part_spec(text: str) -> tuple[int, int]:
    """'3/16' -> (3, 16)."""
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 3/16") from None
    if parts < 1 or not 0 <= part < parts:
        raise argparse.ArgumentTypeError(f"{text!r}: need N >= 1 and 0 <= I < N")
    return part, parts


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per dataset layout."""
    parser = argparse.ArgumentParser(prog="python -m src.preprocess", epilog=EXAMPLE,
                                     description="Precompute autoencoder latents and text embeddings into shards.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    p = sub.add_parser("imagenet", help="class folders (n01440764/...) + class names; 'a photo of a <name>'")
    p.add_argument("--root", required=True, help="folder of class folders, e.g. ILSVRC/Data/CLS-LOC/train")
    p.add_argument("--class-names", required=True,
                   help="LOC_synset_mapping.txt ('n01440764 tench, Tinca tinca') or JSON {synset: [names]}")
    common_options(p)
    p = sub.add_parser("cc12m", help="a TSV of local image paths + captions, or webdataset tars of jpg + txt")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tsv", help="TSV file: <image path>\\t<caption> per line")
    group.add_argument("--tars", nargs="+", help="webdataset .tar files, or one folder of them")
    p.add_argument("--image-root", default=None, help="folder the TSV's paths are relative to (default: its folder)")
    common_options(p)
    p = sub.add_parser("coco", help="COCO-2014 val images + captions_val2014.json (the evaluation set)")
    p.add_argument("--images", required=True, help="image folder, e.g. val2014/")
    p.add_argument("--annotations", required=True, help="captions_val2014.json")
    p.add_argument("--caption", choices=CAPTION_CHOICES, default="first",
                   help="which of an image's captions: first (lowest annotation id) or a seeded random one")
    common_options(p)
    return parser


def build_source(args: argparse.Namespace):
    """The dataset source named by the parsed arguments."""
    if args.dataset == "imagenet":
        return ImageNetSource(args.root, args.class_names, seed=args.seed)
    if args.dataset == "cc12m":
        if args.tsv:
            return TsvSource(args.tsv, args.image_root)
        return TarSource(args.tars[0] if len(args.tars) == 1 else args.tars)
    return CocoSource(args.images, args.annotations, caption_choice=args.caption, seed=args.seed)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """PreprocessConfig from the parsed arguments."""
    return PreprocessConfig(
        out=args.out, resolution=args.resolution, autoencoder=args.autoencoder,
        autoencoder_config=args.autoencoder_config, latent=args.latent, clip=[tuple(c) for c in args.clip],
        t5=args.t5, t5_length=args.t5_length, chunk_size=args.chunk_size, batch_size=args.batch_size,
        num_workers=args.num_workers, seed=args.seed, shuffle=args.shuffle, stats_from=args.stats_from,
        device=args.device, precision=args.precision,
        autoencoder_precision=args.autoencoder_precision, text_cache=args.text_cache, max_chunks=args.max_chunks,
        progress=args.progress, part=args.part[0], parts=args.part[1], cache_dir=args.cache_dir,
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, check every input before any work, run; exit status 0 when complete (or this part is done), 3 when
    stopped early (--max-chunks), 2 on bad input, 1 when the file system refuses a write (full, read-only)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
        config.check_inputs()
        meta = preprocess(build_source(args), config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk (1): the chunks written so far are kept, a rerun resumes
        print(f"error: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 1 if refused_write(e) else 2  # else bad input, e.g. --out names a file
    return 0 if meta is not None else 3


if __name__ == "__main__":
    sys.exit(main())
